// The npm package as a user gets it: `npm pack`, installed offline from the tarball into a scratch project, its
// exports resolved by Node, then a tiny page in that project imports it from node_modules and converts fixtures in
// the package's worker under a strict CSP. Bytes must match the native CLI's.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FIXTURES, NATIVE, ROOT, ensureBuilt, hashTree, launch, nativeOutput } from './harness.mjs';
import { serveFiles } from './rangeserver.mjs';
import { serve } from './serve.mjs';

const PT = join(FIXTURES, 'pt/qwen2_tiny_full_weights.pt');
const MEGATRON = join(FIXTURES, 'megatron/qwen2_tp2/actor');
const BASE = join(FIXTURES, 'megatron/qwen2_tp2/base_hf');
const HOSTILE = join(FIXTURES, '../hostile/pickle_os_system.pt');
const TRUST = join(FIXTURES, 'trust/simple_namespace_config.pt');

const SHIPPED = [
  'README.md',
  'js/bridge.js',
  'js/cli.js',
  'js/fetcher.js',
  'js/index.d.ts',
  'js/index.js',
  'js/nodefetch.js',
  'js/worker.js',
  'js/writer.js',
  'package.json',
  'web/pkg/ckptconv_cli.wasm',
  'web/pkg/ckptconv_web.d.ts',
  'web/pkg/ckptconv_web.js',
  'web/pkg/ckptconv_web_bg.wasm',
  'web/www/blobread.js',
  'web/www/range.js',
];

// The scratch project's page: three inputs, and a function the test calls to convert with the package.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>ckptconv package test</title>
<input type="file" id="file">
<input type="file" id="dir" webkitdirectory>
<input type="file" id="base" webkitdirectory>
<script type="module" src="app.js"></script>`;

const APP = `import { convert, inspect, scan } from './node_modules/ckptconv/js/index.js';
async function hex(buf) {
  return [...new Uint8Array(await crypto.subtle.digest('SHA-256', buf))].map((b) => b.toString(16).padStart(2, '0')).join('');
}
// Streams every output in order; returns {name: sha256} plus the stream's chunk count and the engine's memory.
window.run = async (inputId, withBase, options = {}) => {
  const input = typeof inputId === 'string' ? document.getElementById(inputId).files : inputId;
  const base = withBase === true ? document.getElementById('base').files : withBase || undefined;
  const plan = await inspect(input, { base, ...options });
  const conversion = await convert(input, { base, ...options });
  const hashes = {};
  let chunks = 0;
  for (const file of conversion.files) {
    const parts = [];
    const reader = file.stream().getReader();
    for (let r; !(r = await reader.read()).done; ) parts.push(r.value), chunks++;
    const bytes = await new Blob(parts).arrayBuffer();
    if (bytes.byteLength !== file.size) throw new Error(file.name + ': ' + bytes.byteLength + ' of ' + file.size);
    hashes[file.name] = await hex(bytes);
  }
  return { hashes, chunks, tensors: plan.tensors.length, memory: await conversion.memoryBytes() };
};
window.fails = async (inputId, options = {}) => {
  try {
    await convert(document.getElementById(inputId).files, options);
    return null;
  } catch (e) {
    return e.message;
  }
};
window.scanOf = async (inputId) => scan(document.getElementById(inputId).files[0]);
window.outOfOrder = async () => {
  const c = await convert(document.getElementById('file').files, { maxShardSize: '100KB' });
  try {
    c.files.at(-1).stream();
    return 'accepted';
  } catch (e) {
    return e.message;
  } finally {
    c.terminate();
  }
};`;

let scratch, server, browser, tarball;

before(async () => {
  ensureBuilt();
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-package-test-'));
  const packed = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: ROOT }).toString(),
  );
  tarball = { path: join(scratch, packed[0].filename), files: packed[0].files.map((f) => f.path).sort() };
  const project = join(scratch, 'app');
  execFileSync('mkdir', ['-p', project]);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'scratch', private: true, type: 'module' }));
  execFileSync('npm', ['install', tarball.path, '--offline', '--no-audit', '--no-fund'], {
    cwd: project,
    stdio: 'pipe',
  });
  writeFileSync(join(project, 'index.html'), PAGE);
  writeFileSync(join(project, 'app.js'), APP);
  server = await serve({ '/': project });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

describe('the npm package', () => {
  test('allowGlobals accepts a class off the allowlist, as the CLI\'s --allow-global does', async () => {
    const page = await browser.context.newPage();
    await page.goto(server.url);
    await page.waitForFunction(() => typeof window.run === 'function');
    await page.setInputFiles('#file', TRUST);
    const refused = await page.evaluate(() => window.fails('file'));
    assert.match(refused, /types\.SimpleNamespace \(called by REDUCE, pickle byte \d+\)/);
    assert.match(refused, /--allow-global types\.SimpleNamespace/);
    assert.match(await page.evaluate(() => window.fails('file', { allowGlobals: ['types'] })), /^allowGlobals: 'types'/);
    const ok = await page.evaluate(() => window.run('file', false, { allowGlobals: ['types.SimpleNamespace'] }));
    const native = await nativeOutput('convert', TRUST, 'OUT', '--allow-global', 'types.SimpleNamespace');
    assert.deepEqual(ok.hashes, hashTree(native));
    await page.close();
  });

  test("scan() reports what the CLI's scan --json reports, byte for byte, executing nothing", async () => {
    const page = await browser.context.newPage();
    await page.goto(server.url);
    await page.waitForFunction(() => typeof window.scanOf === 'function');
    for (const [file, dangerous] of [[PT, false], [HOSTILE, true], [TRUST, true]]) {
      await page.setInputFiles('#file', file);
      const report = await page.evaluate(() => window.scanOf('file'));
      // Run where the file is, so that both name it by its base name, as the browser gives it.
      const cli = spawnSync(NATIVE, ['scan', basename(file), '--json'], { encoding: 'utf8', cwd: dirname(file) });
      assert.equal(cli.status, dangerous ? 1 : 0, cli.stderr);
      assert.deepEqual(report, JSON.parse(cli.stdout));
      assert.equal(report.dangerous, dangerous);
      assert.ok(report.globals.length > 0);
    }
    await page.close();
  });

  test('the tarball ships only the engine, the JS, the types and the README', () => {
    assert.deepEqual(tarball.files, SHIPPED);
  });

  test('Node resolves its exports from the installed copy', () => {
    const project = join(scratch, 'app');
    const script = `
      const m = await import('ckptconv');
      console.log(JSON.stringify({
        api: Object.keys(m).sort(),
        worker: import.meta.resolve('ckptconv/worker').endsWith('/node_modules/ckptconv/js/worker.js'),
        wasm: import.meta.resolve('ckptconv/ckptconv_web_bg.wasm').endsWith('/web/pkg/ckptconv_web_bg.wasm'),
      }));`;
    const out = JSON.parse(execFileSync('node', ['--input-type=module', '-e', script], { cwd: project }).toString());
    assert.deepEqual(out, {
      api: ['convert', 'convertToFolder', 'inspect', 'scan', 'toInputs'],
      worker: true,
      wasm: true,
    });
  });

  test('a page imports it from node_modules and converts a .pt and a Megatron folder byte-identically', async () => {
    const page = await browser.context.newPage();
    const foreign = [];
    page.on(
      'request',
      (r) => !r.url().startsWith(server.url) && !/^(blob|data):/.test(r.url()) && foreign.push(r.url()),
    );
    await page.goto(server.url);
    await page.waitForFunction(() => typeof window.run === 'function');

    await page.setInputFiles('#file', PT);
    const pt = await page.evaluate(() => window.run('file', false));
    assert.equal(pt.tensors, 27);
    assert.deepEqual(pt.hashes, hashTree(await nativeOutput('convert', PT, 'OUT')));
    assert.ok(pt.memory > 0);

    await page.setInputFiles('#dir', MEGATRON);
    await page.setInputFiles('#base', BASE);
    const mg = await page.evaluate(() => window.run('dir', true));
    const native = hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE));
    assert.deepEqual(Object.fromEntries(Object.entries(mg.hashes).sort(([a], [b]) => a.localeCompare(b))), native);
    assert.deepEqual(foreign, []);
    await page.close();
  });

  test('a page converts a .pt and a Megatron folder with its base from URLs on another origin (CORS)', async () => {
    const files = await serveFiles(dirname(FIXTURES));
    try {
      const page = await browser.context.newPage();
      await page.goto(server.url);
      await page.waitForFunction(() => typeof window.run === 'function');
      const rel = (p) => relative(dirname(FIXTURES), p);
      const pt = await page.evaluate((url) => window.run([{ path: 'qwen2_tiny_full_weights.pt', url }], false), files.urlOf(rel(PT)));
      assert.deepEqual(pt.hashes, hashTree(await nativeOutput('convert', PT, 'OUT')));
      const mg = await page.evaluate(
        ([dir, base]) => window.run(dir, base),
        [files.manifest(rel(MEGATRON)), files.manifest(rel(BASE))],
      );
      const native = hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE));
      assert.deepEqual(Object.fromEntries(Object.entries(mg.hashes).sort(([a], [b]) => a.localeCompare(b))), native);
      // Only what the plan needs was fetched: the tensors, the headers, the base's files.
      assert.ok(files.log.every((e) => e.status === 206 || e.method === 'OPTIONS'), JSON.stringify(files.log.slice(0, 5)));
      await page.close();
    } finally {
      await files.close();
    }
  });

  test("bad input rejects with the core's message; outputs must be read in order", async () => {
    const page = await browser.context.newPage();
    await page.goto(server.url);
    await page.waitForFunction(() => typeof window.run === 'function');
    await page.setInputFiles('#file', HOSTILE);
    assert.match(
      await page.evaluate(() => window.fails('file')),
      /^pickle_os_system\.pt: refused: the pickle would call a global not on ckptconv's allowlist of data: os\.system /,
    );
    await page.setInputFiles('#file', PT);
    assert.match(
      await page.evaluate(() => window.outOfOrder()),
      /read the outputs in order: open model-00001-of-\d+\.safetensors first/,
    );
    await page.close();
  });
});
