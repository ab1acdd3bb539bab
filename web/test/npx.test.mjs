// `npx ckptconv` from the packed package (npm pack, installed into an empty folder, run offline): the native CLI's
// contract. The native end-to-end suite (tests/e2e) runs with its binary swapped for the installed `ckptconv`, so
// every case it runs must pass again, and every output it writes is checked against the output manifest the native
// binary recorded (tests/manifest/cli.json): byte-identical. Then the same command lines, run both ways, give the
// same stdout, stderr and exit code (success, refusal and usage cases), and an http(s) INPUT converts like the file
// it names, with the native error line when the server ignores Range.
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FIXTURES, NATIVE, PYTHON, ROOT, ensureBuilt, hashTree, makeBigPt } from './harness.mjs';
import { serveFiles } from './rangeserver.mjs';

const TESTS = dirname(FIXTURES);
let scratch, bin, server;

before(async () => {
  ensureBuilt();
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-npx-test-'));
  const packed = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: ROOT }).toString(),
  );
  const app = join(scratch, 'app');
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'scratch', private: true }));
  execFileSync('npm', ['install', join(scratch, packed[0].filename), '--offline', '--no-audit', '--no-fund'], {
    cwd: app,
    stdio: 'pipe',
  });
  bin = join(app, 'node_modules/.bin/ckptconv');
  server = await serveFiles(TESTS);
});

after(async () => {
  await server?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** Runs `cmd` with `args` (OUT: a fresh folder, the same relative name both ways) in a fresh folder. */
function runIn(cmd, args, cwd) {
  mkdirSync(cwd, { recursive: true });
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 300_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, error: r.error };
}

/** runIn without blocking this process: the range server answers from its event loop. */
function runAsync(cmd, args, cwd) {
  mkdirSync(cwd, { recursive: true });
  return new Promise((ok) =>
    execFile(cmd, args, { cwd, encoding: 'utf8', timeout: 300_000 }, (error, stdout, stderr) =>
      ok({ status: error ? (error.code ?? null) : 0, stdout, stderr }),
    ),
  );
}

let runs = 0;
/** The same command line through the native binary and through npx, each in its own fresh folder. */
function both(...args) {
  const dir = join(scratch, `run${runs++}`);
  const native = runIn(NATIVE, args, join(dir, 'native'));
  const npx = runIn(bin, args, join(dir, 'npx'));
  return { native, npx, nativeDir: join(dir, 'native'), npxDir: join(dir, 'npx') };
}

const F = (rel) => join(FIXTURES, rel);

describe('npx ckptconv, from the packed package', () => {
  test('the native end-to-end suite passes with npx as the binary; every output matches the native manifest', () => {
    // Every test module that runs the CLI on fixtures; --skip-slow leaves out the >4 GiB zip64 case (bench-sized).
    const r = spawnSync(
      PYTHON,
      // The Ray driver's tests test the driver (the CLI's parts are tested here through test_parts.py).
      ['-m', 'pytest', 'tests/e2e', '-q', '-p', 'no:cacheprovider', '--skip-slow', '-x',
        '--ignore', 'tests/e2e/test_parts_ray.py'],
      { cwd: ROOT, encoding: 'utf8', env: { ...process.env, CKPTCONV: bin }, timeout: 3600_000 },
    );
    assert.equal(r.status, 0, `${r.stdout.slice(-6000)}\n${r.stderr.slice(-3000)}`);
    assert.match(r.stdout, /\d+ passed/);
  });

  const cases = [
    ['inspect', F('pt/qwen2_tiny_full_weights.pt')],
    ['inspect', F('dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint'), '--json'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt'), 'out', '--dtype', 'bf16', '--max-shard-size', '100KB'],
    ['convert', F('dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint'), 'out', '--format', 'pt'],
    ['mg2hf', F('megatron/qwen2_tp2/actor'), 'out', F('megatron/qwen2_tp2/base_hf')],
    ['dcp-to-pt', '--dcp_path', F('dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint'), '--output_path', 'out/x.pt'],
    ['scan', F('pt/qwen2_tiny_full_weights.pt')],
    ['scan', join(TESTS, 'hostile/pickle_os_system.pt'), '--json'],
    ['convert', join(TESTS, 'hostile/pickle_os_system.pt'), 'out'],
    ['convert', 'missing.pt', 'out'],
    ['convert', F('pt'), 'out'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt'), 'out', '--dtype', 'fp8'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt'), 'out', '--max-shard-size', '40KB', '--plan-parts', '3'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt'), 'out', '--max-shard-size', '40KB', '--part', '2/3'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt'), 'out', '--max-shard-size', '40KB', '--finish'],
    ['convert', F('pt/qwen2_tiny_full_weights.pt')],
    ['frobnicate'],
    ['--version'],
  ];
  for (const args of cases) {
    test(`\`ckptconv ${args.map((a) => a.replace(ROOT, '')).join(' ')}\`: same stdout, stderr, exit code, files`, () => {
      const { native, npx, nativeDir, npxDir } = both(...args);
      assert.ifError(npx.error);
      assert.equal(npx.status, native.status, npx.stderr);
      assert.equal(npx.stderr, native.stderr);
      assert.equal(npx.stdout, native.stdout);
      assert.deepEqual(hashTree(npxDir), hashTree(nativeDir));
    });
  }

  test('an http(s) INPUT converts like the file it names; a server that ignores Range gets an error line, exit 1', async () => {
    const rel = 'fixtures/pt/qwen2_tiny_full_weights.pt';
    const url = server.urlOf(rel);
    const dir = join(scratch, `url${runs++}`);
    server.mode = 'normal';
    const viaUrl = await runAsync(bin, ['convert', url, 'out', '--dtype', 'bf16'], join(dir, 'npx'));
    assert.equal(viaUrl.status, 0, viaUrl.stderr);
    const native = runIn(NATIVE, ['convert', join(TESTS, rel), 'out', '--dtype', 'bf16'], join(dir, 'native'));
    assert.equal(native.status, 0, native.stderr);
    assert.deepEqual(hashTree(join(dir, 'npx')), hashTree(join(dir, 'native')));
    const scanned = await runAsync(bin, ['scan', server.urlOf('hostile/pickle_os_system.pt')], join(dir, 'scan'));
    assert.equal(scanned.status, 1, scanned.stderr);
    assert.match(scanned.stdout, /os\.system/);

    server.mode = 'ignore-range';
    const refused = await runAsync(bin, ['convert', url, 'out'], join(dir, 'refused'));
    server.mode = 'normal';
    assert.equal(refused.status, 1);
    assert.equal(
      refused.stderr.trim().split('\n').at(-1),
      `ckptconv: error[io]: ${url}: I/O error: the server ignored the Range header (it answered 200 with the whole ` +
        'file): ckptconv reads URLs with HTTP range requests; use a server that supports them (and, from a web ' +
        'page, allows the Range header by CORS)',
    );
    assert.deepEqual(hashTree(join(dir, 'refused')), {});
    // The native binary says where URLs are read.
    const nativeUrl = await runAsync(NATIVE, ['inspect', url], join(dir, 'native-url'));
    assert.equal(nativeUrl.status, 1);
    assert.match(nativeUrl.stderr, /this build reads files only; `npx ckptconv` \(the npm package\) reads http\(s\) URLs/);
  });

  describe('a ~400 MB .pt from a URL: verbatim bytes go from the socket to the file in the host', () => {
    let big, bigServer, url;
    // The CLI's arguments: several shards, so that each file's copies are waited for before the next.
    const args = (input) => ['convert', input, 'out', '--max-shard-size', '100MB'];
    /** Bytes a `bytes=a-b` Range asks for (0 without one). */
    const rangeLength = (range) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(range ?? '');
      return m ? Number(m[2]) - Number(m[1]) + 1 : 0;
    };
    before(async () => {
      mkdirSync(join(scratch, 'big'));
      big = join(scratch, 'big', 'qwen2_small_bf16.pt');
      makeBigPt(big);
      bigServer = await serveFiles(dirname(big));
      url = bigServer.urlOf('qwen2_small_bf16.pt');
    });
    after(async () => bigServer?.close());

    test('converts like the file it names, fetching each byte once; dropped connections are resumed', async () => {
      const dir = join(scratch, `big${runs++}`);
      const native = runIn(NATIVE, args(big), join(dir, 'native'));
      assert.equal(native.status, 0, native.stderr);
      const want = hashTree(join(dir, 'native'));
      assert.ok(Object.keys(want).length >= 5, Object.keys(want).join(' '));
      for (const mode of ['normal', 'drop']) {
        bigServer.reset();
        bigServer.mode = mode;
        const r = await runAsync(bin, args(url), join(dir, mode));
        bigServer.mode = 'normal';
        assert.equal(r.status, 0, r.stderr);
        assert.deepEqual(hashTree(join(dir, mode)), want, mode);
        const sent = bigServer.bytesSent();
        if (mode === 'normal') assert.ok(sent <= statSync(big).size * 1.01, `fetched ${sent} bytes`);
        // Copies ask for up to 16 MiB at once; a dropped one was resumed after the half that came.
        else assert.ok(bigServer.log.some((e) => e.dropped && rangeLength(e.range) > 1 << 20), 'no copy was dropped');
      }
    });

    test('planning asks for the storages\' local headers together, not one round trip each', async () => {
      const dir = join(scratch, `big${runs++}`);
      bigServer.reset();
      bigServer.delayMs = 20; // a distant server
      let r;
      try {
        r = await runAsync(bin, ['inspect', url], dir);
      } finally {
        bigServer.delayMs = 0;
      }
      assert.equal(r.status, 0, r.stderr);
      const native = runIn(NATIVE, ['inspect', big], join(dir, 'native'));
      // The same report but for its first line (the input's name).
      assert.equal(native.status, 0, native.stderr);
      assert.deepEqual(r.stdout.split('\n').slice(1), native.stdout.split('\n').slice(1));
      assert.ok(Number(/^tensors: (\d+)/m.exec(r.stdout)?.[1]) > 100, r.stdout.slice(0, 400));
      assert.ok(bigServer.maxInFlight() >= 4, `at most ${bigServer.maxInFlight()} requests at once`);
      assert.ok(bigServer.bytesSent() <= statSync(big).size / 100, `fetched ${bigServer.bytesSent()} bytes`);
    });

    test('a file that changes mid-copy fails naming the URL, and leaves nothing', async () => {
      const dir = join(scratch, `big${runs++}`);
      bigServer.reset();
      // Planning reads 4 KiB blocks: the first longer range is a copy, and every request after it sees the file
      // one byte longer.
      bigServer.onRequest = (req) => {
        if (rangeLength(req.range) > 1 << 20) bigServer.mode = 'grow';
      };
      let r;
      try {
        r = await runAsync(bin, args(url), dir);
      } finally {
        bigServer.onRequest = null;
        bigServer.mode = 'normal';
      }
      assert.equal(r.status, 1, r.stderr);
      const size = statSync(big).size;
      assert.match(
        r.stderr.trim().split('\n').at(-1),
        new RegExp(
          `^ckptconv: error\\[io\\]: ${url}: I/O error: read at \\d+: the file changed while it was read: it had ${size} ` +
            `bytes, now ${size + 1}$`,
        ),
      );
      assert.deepEqual(hashTree(dir), {});
    });

    test('a write the system refuses fails with the native error line, and leaves nothing', async () => {
      // A 1 MiB file size limit (EFBIG past it; SIGXFSZ ignored, as Node itself does): the first shard's copies fail.
      const limited = ['-c', 'ulimit -f 1024; trap "" XFSZ; exec "$@"', 'limited'];
      const dir = join(scratch, `big${runs++}`);
      const native = await runAsync('bash', [...limited, NATIVE, ...args(big)], join(dir, 'native'));
      const npx = await runAsync('bash', [...limited, bin, ...args(url)], join(dir, 'npx'));
      assert.equal(native.status, 1, native.stderr);
      assert.equal(npx.status, 1, npx.stderr);
      const last = (r) => r.stderr.trim().split('\n').at(-1);
      assert.match(last(native), /^ckptconv: error\[output\]: out\/\..*: File too large \(os error 27\)$/);
      assert.equal(last(npx), last(native));
      assert.deepEqual(hashTree(join(dir, 'npx')), {});
    });
  });
});
