// `npx ckptconv` from the packed package (npm pack, installed into an empty folder, run offline): the native CLI's
// contract. The native end-to-end suite (tests/e2e) runs with its binary swapped for the installed `ckptconv`, so
// every case it runs must pass again, and every output it writes is checked against the output manifest the native
// binary recorded (tests/manifest/cli.json): byte-identical. Then the same command lines, run both ways, give the
// same stdout, stderr and exit code (success, refusal and usage cases), and an http(s) INPUT converts like the file
// it names, with the native error line when the server ignores Range.
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FIXTURES, NATIVE, PYTHON, ROOT, ensureBuilt, hashTree } from './harness.mjs';
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
});
