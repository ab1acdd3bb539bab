// The npm package in Node, its inputs behind a real HTTP server (rangeserver.mjs: Range + CORS, and fault modes):
// a .pt, a DCP folder and a Megatron folder with its base, given as {path, url} lists, convert byte-identically to
// the native CLI on the same files; so do paths and Node Blobs. A dropped connection or a 503 is retried and the
// output is unchanged; a server that ignores Range, or a file that changes length, gets an error naming the URL, and
// convertToFolder leaves nothing behind on any failure or abort. The server counts the bytes it sends: inspect of a
// ~400 MB .pt fetches under 1% of it, convert each byte at most once (≤ 1.01× the input).
import assert from 'node:assert/strict';
import { openAsBlob, readdirSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { convert, convertToFolder, inspect, scan } from '../../js/index.js';
import { FIXTURES, NATIVE, ensureBuilt, hashTree, makeBigPt, nativeOutput } from './harness.mjs';
import { serveFiles } from './rangeserver.mjs';

// Paths under tests/, which the server serves.
const TESTS = dirname(FIXTURES);
const PT = 'fixtures/pt/qwen2_tiny_full_weights.pt';
const DCP = 'fixtures/dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint';
const MEGATRON = 'fixtures/megatron/qwen2_tp2/actor';
const BASE = 'fixtures/megatron/qwen2_tp2/base_hf';
const HOSTILE = 'hostile/pickle_os_system.pt';

let server, scratch, bigServer, big;

before(async () => {
  ensureBuilt();
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-node-test-'));
  server = await serveFiles(TESTS);
  await mkdir(join(scratch, 'big'));
  big = makeBigPt(join(scratch, 'big', 'qwen2_small_bf16.pt'));
  bigServer = await serveFiles(dirname(big));
});

after(async () => {
  await server?.close();
  await bigServer?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** A fresh output folder path (not created). */
let outs = 0;
const freshOut = () => join(scratch, `out${outs++}`);

/** Every file under `dir`, hidden ones included, relative. */
function listing(dir) {
  const out = [];
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

const urlOf = (rel) => ({ path: rel.split('/').pop(), url: server.urlOf(rel) });

describe('the npm package in Node, from URLs', () => {
  for (const [label, input, cli] of [
    ['a .pt', () => urlOf(PT), ['convert', join(TESTS, PT), 'OUT']],
    ['a DCP folder', () => server.manifest(DCP), ['convert', join(TESTS, DCP), 'OUT']],
  ]) {
    test(`${label} converts byte-identically to the native CLI`, async () => {
      server.mode = 'normal';
      const out = freshOut();
      await convertToFolder(input(), out);
      assert.deepEqual(hashTree(out), hashTree(await nativeOutput(...cli)));
    });
  }

  test('a Megatron folder with its base, both from URLs, matches `ckptconv mg2hf`', async () => {
    server.mode = 'normal';
    const out = freshOut();
    const plan = await convertToFolder(server.manifest(MEGATRON), out, { base: server.manifest(BASE) });
    assert.ok(plan.notes.some((n) => /TP=2/.test(n)), plan.notes.join('\n'));
    const native = hashTree(await nativeOutput('mg2hf', join(TESTS, MEGATRON), 'OUT', join(TESTS, BASE)));
    assert.ok('config.json' in native);
    assert.deepEqual(hashTree(out), native);
  });

  test('dropped connections and 503s are retried; the output is unchanged', async () => {
    for (const mode of ['drop', 'flaky-5xx']) {
      server.reset();
      server.mode = mode;
      const out = freshOut();
      await convertToFolder(server.manifest(DCP), out);
      const faults = mode === 'drop' ? server.drops() : server.log.filter((e) => e.status === 503).length;
      assert.ok(faults > 0, `${mode}: no fault was injected`);
      assert.deepEqual(hashTree(out), hashTree(await nativeOutput('convert', join(TESTS, DCP), 'OUT')));
    }
    server.mode = 'normal';
  });

  test('a server that ignores Range gets an error naming the URL; nothing is left', async () => {
    server.mode = 'ignore-range';
    const out = freshOut();
    await assert.rejects(convertToFolder(urlOf(PT), out), (e) => {
      assert.ok(e.message.includes(server.urlOf(PT)), e.message);
      assert.match(e.message, /ignored the Range header/);
      return true;
    });
    assert.ok(!statSync(out, { throwIfNoEntry: false }), 'the output folder was created');
    server.mode = 'normal';
  });

  test('a file whose length changes mid-run is an error naming it; no file is left, finished or partial', async () => {
    server.reset();
    server.mode = 'grow';
    const out = freshOut();
    await assert.rejects(convertToFolder(server.manifest(MEGATRON), out, { base: server.manifest(BASE) }), (e) => {
      assert.match(e.message, /http:\/\/127\.0\.0\.1:\d+\/\S+: the file changed while it was read: it had \d+ bytes, now \d+/);
      return true;
    });
    assert.deepEqual(statSync(out, { throwIfNoEntry: false }) ? listing(out) : [], []);
    server.mode = 'normal';
  });

  test('an abort mid-way stops the conversion and deletes the partial files', async () => {
    server.mode = 'normal';
    const out = freshOut();
    const ac = new AbortController();
    const c = convertToFolder([{ path: 'qwen2_small_bf16.pt', url: bigServer.urlOf('qwen2_small_bf16.pt') }], out, {
      signal: ac.signal,
      dtype: 'fp16',
    });
    // Abort once some output exists on disk (only as a hidden .partial).
    for (let i = 0; i < 600 && !(statSync(out, { throwIfNoEntry: false }) && listing(out).length); i++)
      await new Promise((ok) => setTimeout(ok, 50));
    assert.deepEqual(listing(out), ['.model.safetensors.partial']);
    ac.abort();
    await assert.rejects(c, /abort/i);
    assert.deepEqual(listing(out), []);
  });

  test('inspect of a ~400 MB .pt fetches under 1% of it; convert fetches each byte at most once', async () => {
    const size = statSync(big).size;
    const file = { path: 'qwen2_small_bf16.pt', url: bigServer.urlOf('qwen2_small_bf16.pt') };
    bigServer.reset();
    const plan = await inspect(file);
    assert.ok(plan.tensors.length > 100, `${plan.tensors.length} tensors`);
    const inspected = bigServer.bytesSent();
    assert.ok(inspected <= size / 100, `inspect fetched ${inspected} of ${size} bytes`);
    for (const dtype of [undefined, 'fp16']) {
      bigServer.reset();
      const out = freshOut();
      await convertToFolder(file, out, { dtype });
      const fetched = bigServer.bytesSent();
      assert.ok(fetched <= size * 1.01, `convert (${dtype ?? 'keep'}) fetched ${fetched} of ${size} bytes`);
      const native = dtype ? ['--dtype', dtype] : [];
      assert.deepEqual(hashTree(out), hashTree(await nativeOutput('convert', big, 'OUT', ...native)));
    }
  });

  test("scan() of a URL reports what the CLI's scan --json reports, reading only the pickles", async () => {
    for (const [rel, dangerous] of [
      [PT, false],
      [HOSTILE, true],
    ]) {
      const report = await scan(urlOf(rel));
      const file = join(TESTS, rel);
      const cli = spawnSync(NATIVE, ['scan', rel.split('/').pop(), '--json'], { encoding: 'utf8', cwd: dirname(file) });
      assert.equal(cli.status, dangerous ? 1 : 0, cli.stderr);
      assert.deepEqual(report, JSON.parse(cli.stdout));
    }
    bigServer.reset();
    const report = await scan({ path: 'qwen2_small_bf16.pt', url: bigServer.urlOf('qwen2_small_bf16.pt') });
    assert.equal(report.dangerous, false);
    assert.ok(bigServer.bytesSent() <= statSync(big).size / 100, `scan fetched ${bigServer.bytesSent()} bytes`);
  });
});

describe('the npm package in Node, from paths and Blobs', () => {
  test('a path of a file or a folder, and a Node Blob, convert byte-identically to the native CLI', async () => {
    for (const [input, native] of [
      [join(TESTS, PT), join(TESTS, PT)],
      [join(TESTS, DCP), join(TESTS, DCP)],
      [{ path: 'qwen2_tiny_full_weights.pt', file: await openAsBlob(join(TESTS, PT)) }, join(TESTS, PT)],
    ]) {
      const out = freshOut();
      await convertToFolder(input, out);
      assert.deepEqual(hashTree(out), hashTree(await nativeOutput('convert', native, 'OUT')));
    }
  });

  test('outputs stream in order; convertToFolder refuses to replace existing files unless told', async () => {
    const c = await convert(join(TESTS, PT), { maxShardSize: '100KB' });
    assert.ok(c.files.length > 1);
    assert.throws(() => c.files[1].stream(), /read the outputs in order/);
    c.terminate();
    const out = freshOut();
    await convertToFolder(join(TESTS, PT), out);
    await assert.rejects(convertToFolder(join(TESTS, PT), out), /already exists/);
    await convertToFolder(join(TESTS, PT), out, { overwrite: true });
    assert.deepEqual(listing(out), ['model.safetensors']);
  });
});
