// The page in headless Chromium: inputs by drop, file input and folder input; outputs read back from OPFS (and
// one download) must be byte-identical to the native CLI's; cancel and failures leave nothing finished-looking in
// OPFS; bad input shows the core's message; nothing is fetched from anywhere but the page's origin (save, in the URL
// tests, the range server that serves the inputs).
// UPDATE_SCREENSHOTS=1 writes web/screenshots/{before,during,after}.png (else they go to a temp folder).
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, mkdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import {
  FIXTURES,
  NATIVE,
  PYTHON,
  ROOT,
  ensureBuilt,
  hashTree,
  launch,
  makeBigPt,
  nativeOutput,
  nativeOutputIn,
  sha256,
} from './harness.mjs';
import { formatBytes } from '../www/format.js';
import { recordPage, startTest } from './manifest.mjs';
import { MANIFEST_PREFIX, serveFiles } from './rangeserver.mjs';
import { PAGE_MOUNTS, serve } from './serve.mjs';

const PT = join(FIXTURES, 'pt/qwen2_tiny_full_weights.pt');
const STEP = join(FIXTURES, 'dcp/fsdp2_ws2/global_step_1');
const DCP = join(STEP, 'actor/dcp_checkpoint');
const MEGATRON = join(FIXTURES, 'megatron/qwen2_tp2/actor');
const BASE = join(FIXTURES, 'megatron/qwen2_tp2/base_hf');
const MEGATRON_DIST = join(FIXTURES, 'megatron/qwen2_tp2_pp2/actor_dist');
const MEGATRON_DIST_BASE = join(FIXTURES, 'megatron/qwen2_tp2_pp2/base_hf');
const HOSTILE = join(FIXTURES, '../hostile/pickle_os_system.pt');
const TRUST = join(FIXTURES, 'trust/simple_namespace_config.pt');
const LORA = join(FIXTURES, 'lora/full_weights.pt');
const LORA_BASE = join(FIXTURES, 'lora/base_qwen2');

let server, browser, scratch, bigPt, deflated;

before(async () => {
  ensureBuilt();
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-page-test-'));
  bigPt = makeBigPt(join(scratch, 'qwen2_small_bf16.pt'));
  // A real torch.save re-zipped with zipfile ZIP_DEFLATED, its stored original and broken copies (tests/deflated.py).
  deflated = join(scratch, 'deflated');
  execFileSync(PYTHON, [join(ROOT, 'tests/deflated.py'), deflated], { stdio: 'pipe' });
  server = await serve(PAGE_MOUNTS);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/**
 * A fresh tab on the page that records every request and page error, for clean() to check; `allow` lists other
 * origins (base URLs) the tab may fetch from.
 */
async function openPage(query = '', { allow = [] } = {}) {
  const page = await browser.context.newPage();
  const foreign = [];
  const errors = [];
  const allowed = [server.url, ...allow];
  page.on('request', (r) => {
    if (!/^(blob|data):/.test(r.url()) && !allowed.some((a) => r.url().startsWith(a))) foreign.push(r.url());
  });
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(server.url + query);
  page.clean = async () => {
    assert.deepEqual(foreign, [], 'the page fetched from another origin');
    assert.deepEqual(errors, [], 'uncaught errors on the page');
    await page.close();
  };
  return page;
}

async function waitState(page, states, timeout = 120_000) {
  await page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout });
  return page.evaluate(() => document.body.dataset.state);
}

const errorText = (page) => page.textContent('#error');
const opfs = (page) => page.evaluate(() => window.ckptconvTest.list());

/** OPFS entries that were not there in `before`: other tabs' jobs may come and go meanwhile. */
async function newInOpfs(page, before) {
  const old = new Set(before.map((f) => f.path));
  return (await opfs(page)).filter((f) => !old.has(f.path));
}

/** Converts what the page has planned; returns the job and {output name: sha256} read back from OPFS. */
async function convertOnPage(page) {
  assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
  const before = await opfs(page);
  await page.click('#convert');
  assert.equal(await waitState(page, ['done', 'failed']), 'done', await errorText(page));
  const job = await page.evaluate(() => window.ckptconvTest.job());
  const hashes = {};
  for (const o of job.outputs) hashes[o.name] = await page.evaluate((n) => window.ckptconvTest.sha256(n), o.name);
  recordPage(hashes);
  // Finished outputs carry their final names, and nothing else is left in the job folder.
  if (job.store === 'opfs') {
    assert.deepEqual(
      (await newInOpfs(page, before)).map((f) => f.path).sort(),
      job.outputs.map((o) => `${job.id}/${o.name}`).sort(),
    );
  } else {
    assert.deepEqual(await newInOpfs(page, before), []);
  }
  return { job, hashes: Object.fromEntries(Object.entries(hashes).sort(([a], [b]) => a.localeCompare(b))) };
}

/** Dispatches a real drop event carrying Files built inside the page from these bytes. */
async function dropFiles(page, files) {
  const payload = files.map(({ name, bytes }) => ({ name, b64: bytes.toString('base64') }));
  await page.evaluate((payload) => {
    const dt = new DataTransfer();
    for (const { name, b64 } of payload)
      dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
    const zone = document.getElementById('drop');
    for (const type of ['dragenter', 'dragover', 'drop']) {
      zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
    }
  }, payload);
}

describe('the page', () => {
  beforeEach((t) => startTest(t.name));
  test('a dropped .pt converts byte-identically to the CLI; plan table and a download link work', async () => {
    const page = await openPage();
    await dropFiles(page, [{ name: basename(PT), bytes: readFileSync(PT) }]);
    await waitState(page, ['ready', 'invalid']);
    assert.match(await page.textContent('#plan-format'), /torch\.save zip/);
    assert.equal(await page.locator('#plan-tensors tbody tr').count(), 27);
    assert.equal(await page.textContent('#tensors-count'), '27 tensors');
    assert.match(
      await page.textContent('#plan-tensors tbody tr:first-child'),
      /model\.embed_tokens\.weight\s*F32\s*\[128, 64\]/,
    );
    const { job, hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('convert', PT, 'OUT')));
    // The f32 tensors pass unchanged: they went out as copies of the input's ranges, past wasm memory.
    const tensorBytes = Number((await page.getAttribute('#tensors-total', 'title')).replace(/\D/g, ''));
    assert.ok(job.run.copiedBytes > 0 && job.run.copiedBytes === tensorBytes, JSON.stringify(job.run));

    // The download link hands over the OPFS file itself.
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#outputs a')]);
    assert.equal(download.suggestedFilename(), 'model.safetensors');
    assert.equal(sha256(readFileSync(await download.path())), hashes['model.safetensors']);
    await page.clean();
  });

  test("options reach the engine: bf16 and sharding give the CLI's shards and index", async () => {
    const page = await openPage();
    await page.setInputFiles('#files-input', PT);
    await waitState(page, ['ready', 'invalid']);
    await page.selectOption('select[name=dtype]', 'bf16');
    await page.fill('input[name=maxShardSize]', '100KB');
    await page.dispatchEvent('#options', 'change');
    const { hashes } = await convertOnPage(page);
    const native = hashTree(await nativeOutput('convert', PT, 'OUT', '--dtype', 'bf16', '--max-shard-size', '100KB'));
    assert.ok(Object.keys(native).length > 2, 'the fixture should shard');
    assert.deepEqual(hashes, native);
    await page.clean();
  });

  for (const [label, dir] of [
    ['a DCP folder', DCP],
    ['an RLinf global_step folder', STEP],
  ]) {
    test(`${label} through the folder input converts byte-identically to the CLI`, async () => {
      const page = await openPage();
      await page.setInputFiles('#folder-input', dir);
      const { hashes } = await convertOnPage(page);
      assert.deepEqual(hashes, hashTree(await nativeOutput('convert', dir, 'OUT')));
      await page.clean();
    });
  }

  for (const [label, dir] of [
    ['a DCP folder', DCP],
    ['a Megatron torch_dist iteration folder', join(MEGATRON_DIST, 'iter_0000001')],
  ]) {
    test(`dcp-to-pt: ${label} written as one .pt is byte-identical to \`ckptconv dcp-to-pt\``, async () => {
      const page = await openPage();
      await page.setInputFiles('#folder-input', dir);
      await page.selectOption('select[name=mode]', 'dcp-to-pt');
      await page.dispatchEvent('#options', 'change');
      const { job, hashes } = await convertOnPage(page);
      assert.deepEqual(job.outputs.map((o) => o.name), ['full_weights.pt']);
      const out = join(await mkdtemp(join(tmpdir(), 'ckptconv-native-')), 'out');
      execFileSync(NATIVE, ['dcp-to-pt', '--dcp_path', dir, '--output_path', join(out, 'full_weights.pt')], {
        stdio: 'pipe',
      });
      assert.deepEqual(hashes, hashTree(out));
      await page.clean();
    });
  }

  test('a Megatron TP=2 folder with its base folder matches `ckptconv mg2hf`, config and tokenizer included', async () => {
    const page = await openPage();
    await page.setInputFiles('#folder-input', MEGATRON);
    // Without a base the page says what to choose next: no error, Convert disabled, the base button marked.
    assert.equal(await waitState(page, ['ready', 'invalid', 'needs-base']), 'needs-base');
    assert.ok(await page.isHidden('#error'), await errorText(page));
    assert.match(await page.textContent('#plan-status'), /Megatron checkpoint\. Next, choose its base model folder/);
    assert.ok(await page.isDisabled('#convert'));
    assert.ok(await page.$eval('#choose-base', (b) => b.classList.contains('next-step')));
    await page.setInputFiles('#base-input', BASE);
    assert.equal(await waitState(page, ['ready']), 'ready');
    assert.match(await page.textContent('#plan-notes'), /TP=2/);
    const { hashes } = await convertOnPage(page);
    const native = hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE));
    assert.ok('config.json' in native && 'tokenizer.json' in native);
    assert.deepEqual(hashes, native);
    await page.clean();
  });

  test('a Megatron torch_dist folder (TP=2 x PP=2, stacked layers) matches `ckptconv mg2hf`', async () => {
    const page = await openPage();
    await page.setInputFiles('#folder-input', MEGATRON_DIST);
    await page.setInputFiles('#base-input', MEGATRON_DIST_BASE);
    assert.equal(await waitState(page, ['ready']), 'ready');
    assert.match(await page.textContent('#plan-format'), /Megatron-LM torch_dist checkpoint/);
    assert.match(await page.textContent('#plan-notes'), /TP=2 x PP=2/);
    const { hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('mg2hf', MEGATRON_DIST, 'OUT', MEGATRON_DIST_BASE)));
    await page.clean();
  });

  // Every Mixture-of-Experts fixture (and DeepSeek-V3's MLA), rank files and torch_dist, as the CLI converts it.
  const moeCases = ['megatron_moe', 'megatron_mla'].flatMap((root) => {
    const manifest = JSON.parse(readFileSync(join(FIXTURES, root, 'manifest.json'), 'utf8'));
    return Object.entries(manifest).flatMap(([name, m]) =>
      (m.dist ? ['actor', 'actor_dist'] : ['actor']).map((src) => [root, name, src, m]));
  });
  for (const [root, name, src, m] of moeCases) {
    test(`a Megatron MoE folder (${root}/${name}/${src}, EP ${m.ep}) matches \`ckptconv mg2hf\``, async () => {
      const input = join(FIXTURES, root, name, src);
      const base = join(FIXTURES, root, name, 'base_hf');
      const page = await openPage();
      await page.setInputFiles('#folder-input', input);
      await page.setInputFiles('#base-input', base);
      assert.equal(await waitState(page, ['ready']), 'ready');
      assert.match(await page.textContent('#plan-notes'), new RegExp(`MoE: ${m.num_experts} experts \\(top-${m.topk}\\)`));
      const { hashes } = await convertOnPage(page);
      assert.deepEqual(hashes, hashTree(await nativeOutput('mg2hf', input, 'OUT', base)));
      await page.clean();
    });
  }

  // Hugging Face sets, a DeepSpeed ZeRO-3 run and an FP8 release (tests/fixtures/make_input_fixtures.py), as the
  // CLI converts them: config.json from the set's own folder, tied copies dropped, partitions gathered, dequantized.
  for (const [label, rel, baseRel, dtype] of [
    ['a sharded transformers .bin set (its own config.json goes with it)', 'hf_sets/qwen2_bin_sharded', null, null],
    ['a sharded T5 .bin set (tied embeddings) cast to bf16', 'hf_sets/t5_bin_sharded', null, 'bf16'],
    ['a DeepSpeed ZeRO-3 folder (3 ranks) with its base', 'deepspeed/zero3_bf16_w3/ckpt', 'deepspeed/zero3_bf16_w3/hf', null],
    ['an FP8 release dequantized to bf16', 'fp8/block128_st', null, 'bf16'],
  ]) {
    test(`${label} matches \`ckptconv convert\``, async () => {
      const input = join(FIXTURES, rel);
      const base = baseRel && join(FIXTURES, baseRel);
      const page = await openPage();
      await page.setInputFiles('#folder-input', input);
      if (base) await page.setInputFiles('#base-input', base);
      await waitState(page, ['ready', 'invalid']);
      const flags = base ? ['--base', base] : [];
      if (dtype) {
        await page.selectOption('select[name=dtype]', dtype);
        await page.dispatchEvent('#options', 'change');
        flags.push('--dtype', dtype);
      }
      const { hashes } = await convertOnPage(page);
      const native = hashTree(await nativeOutput('convert', input, 'OUT', ...flags));
      assert.ok('config.json' in native, 'the config goes with the weights');
      assert.deepEqual(hashes, native);
      await page.clean();
    });
  }

  test('one shard of a sharded set, dropped alone, is refused naming its missing siblings', async () => {
    const page = await openPage();
    await page.setInputFiles('#files-input', join(FIXTURES, 'hf_sets/bad/lone/model-00002-of-00003.safetensors'));
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    assert.match(await errorText(page), /shard 2 of 3/);
    await page.clean();
  });

  test('a LoRA adapter export (names with a folder) matches the CLI, and "Save all to a folder" writes that tree', async () => {
    const page = await openPage();
    await page.setInputFiles('#files-input', LORA);
    await page.setInputFiles('#base-input', LORA_BASE);
    await page.selectOption('select[name=lora]', 'adapter');
    const { hashes } = await convertOnPage(page);
    // adapter_config.json records the base as given: the CLI gets the bare folder name, as the page does.
    const native = hashTree(
      await nativeOutputIn(
        dirname(LORA_BASE),
        'convert',
        LORA,
        'OUT',
        '--lora',
        'adapter',
        '--base',
        basename(LORA_BASE),
      ),
    );
    assert.ok('lora_adapter/adapter_model.safetensors' in native);
    assert.deepEqual(hashes, native);

    // The folder picker needs a person; hand the page an OPFS folder instead, which takes the same writes.
    const exported = await page.evaluate(async () => {
      const target = await (await navigator.storage.getDirectory()).getDirectoryHandle('export-test', { create: true });
      window.showDirectoryPicker = async () => target;
      document.getElementById('save-folder').click();
      for (let i = 0; !/^Saved/.test(document.getElementById('status').textContent); i++) {
        if (i > 400) throw new Error(`not saved: ${document.getElementById('error').textContent}`);
        await new Promise((ok) => setTimeout(ok, 50));
      }
      const out = {};
      const walk = async (dir, prefix) => {
        for await (const [name, h] of dir.entries()) {
          if (h.kind === 'directory') await walk(h, `${prefix}${name}/`);
          else out[prefix + name] = await window.ckptconvTest.hash(await h.getFile());
        }
      };
      await walk(target, '');
      return out;
    });
    assert.deepEqual(Object.fromEntries(Object.entries(exported).sort(([a], [b]) => a.localeCompare(b))), native);
    await page.clean();
  });

  test('without OPFS (?store=memory) outputs come back as Blobs, still byte-identical', async () => {
    const page = await openPage('?store=memory');
    await page.setInputFiles('#folder-input', DCP);
    const { job, hashes } = await convertOnPage(page);
    assert.equal(job.store, 'memory');
    assert.ok(job.run.copiedBytes > 0, 'the DCP shards pass unchanged: copies read in the engine worker');
    assert.deepEqual(hashes, hashTree(await nativeOutput('convert', DCP, 'OUT')));
    await page.clean();
  });

  test('with ?copiers=0 (no shared access handles) the writer copies ranges itself, byte-identically', async () => {
    const page = await openPage('?copiers=0');
    await page.setInputFiles('#folder-input', MEGATRON);
    await page.setInputFiles('#base-input', BASE);
    const { job, hashes } = await convertOnPage(page);
    assert.equal(job.store, 'opfs');
    assert.ok(job.run.copiedBytes > 0, JSON.stringify(job.run));
    assert.deepEqual(hashes, hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE)));
    await page.clean();
  });

  test("a hostile pickle is refused with the core's message; nothing is written", async () => {
    const page = await openPage();
    const before = await opfs(page);
    await page.setInputFiles('#files-input', HOSTILE);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    const native = (() => {
      try {
        execFileSync(NATIVE, ['inspect', HOSTILE], { stdio: 'pipe' });
      } catch (e) {
        return e.stderr.toString();
      }
      assert.fail('the CLI accepted a hostile pickle');
    })();
    // Same message as the CLI, naming the file (the CLI gives its full path, the page the dropped name).
    const message = native.trim().replace(/^ckptconv: error\[unsafe-global\]: .*?pickle_os_system\.pt: /, '');
    assert.equal(await errorText(page), `Error: pickle_os_system.pt: ${message}`);
    assert.ok(await page.isDisabled('#convert'));
    assert.deepEqual(await newInOpfs(page, before), []);
    await page.clean();
  });

  test('a chosen pickle gets a safety scan: the CLI\'s globals and classes, dangerous ones marked, also when refused', async () => {
    const page = await openPage();
    for (const [file, dangerous] of [[HOSTILE, true], [PT, false]]) {
      await page.setInputFiles('#files-input', file);
      await page.waitForFunction((want) => {
        const box = document.getElementById('scan-box');
        return !box.hidden && box.dataset.dangerous === want;
      }, String(dangerous));
      const rows = await page.$$eval('#scan-globals tbody tr', (trs) =>
        trs.map((tr) => [...tr.cells].map((c) => c.textContent).concat(tr.className)),
      );
      const cli = JSON.parse(spawnSync(NATIVE, ['scan', file, '--json'], { encoding: 'utf8' }).stdout);
      assert.deepEqual(
        rows,
        cli.globals.map((g) => [g.name, g.class + (g.call ? ` (${g.call})` : ''), g.dangerous ? 'danger' : '']),
      );
      const verdict = await page.textContent('#scan-verdict');
      assert.match(verdict, dangerous ? /^Dangerous: it names 1 global\(s\) off/ : /^Clean: /);
      assert.match(await page.textContent('#scan-weights-only'), dangerous ? /would refuse it: os\.system/ : /would accept/);
    }
    await page.clean();
  });

  test('a class off the allowlist is refused by name, and "Allow globals" accepts it as --allow-global does', async () => {
    const page = await openPage();
    await page.setInputFiles('#files-input', TRUST);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    assert.match(await errorText(page), /types\.SimpleNamespace \(called by REDUCE, pickle byte \d+\)/);
    assert.ok(await page.isDisabled('#convert'));
    await page.fill('input[name="allowGlobals"]', 'types.SimpleNamespace');
    await page.dispatchEvent('#options', 'change');
    const { hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('convert', TRUST, 'OUT', '--allow-global', 'types.SimpleNamespace')));
    await page.clean();
  });

  test('a .pt re-zipped with deflated entries converts byte-identically to the CLI, inflated by the core', async () => {
    const file = join(deflated, 'deflated.pt');
    const page = await openPage();
    await page.setInputFiles('#files-input', file);
    const { job, hashes } = await convertOnPage(page);
    const native = hashTree(await nativeOutput('convert', file, 'OUT'));
    assert.deepEqual(hashes, native);
    assert.deepEqual(hashes, hashTree(await nativeOutput('convert', join(deflated, 'original.pt'), 'OUT')));
    // Inflated bytes exist only through the core: none may go out as a copy of the input's Blob.
    assert.equal(job.run.copiedBytes, 0, JSON.stringify(job.run));
    await page.clean();
  });

  for (const [name, when] of [
    ['deflated_pickle_crc_mismatch.pt', 'planning'],
    ['deflated_crc_mismatch.pt', 'converting'],
  ]) {
    test(`a deflated entry that fails its CRC-32 (found ${when}) gives the CLI's message; nothing is left`, async () => {
      const file = join(deflated, name);
      const native = (() => {
        try {
          execFileSync(NATIVE, ['convert', file, join(scratch, 'never')], { stdio: 'pipe' });
        } catch (e) {
          return e.stderr.toString();
        }
        assert.fail(`the CLI converted ${name}`);
      })();
      const message = native.trim().split('\n').at(-1).replace(/^ckptconv: error\[zip\]: .*?\.pt: /, '');
      assert.match(message, /entry 'archive\/data(\.pkl|\/0)' fails its CRC-32 check/);
      const page = await openPage();
      const before = await opfs(page);
      await page.setInputFiles('#files-input', file);
      if (when === 'planning') {
        assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
      } else {
        assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
        await page.click('#convert');
        assert.equal(await waitState(page, ['done', 'failed']), 'failed');
      }
      assert.equal(await errorText(page), `Error: ${name}: ${message}`);
      assert.deepEqual(await newInOpfs(page, before), []);
      await page.clean();
    });
  }

  test('a malformed adapter_config.json in the base folder is refused, as the CLI refuses it', async () => {
    // Its lora_alpha decides the merge: falling back to alpha = r would give other weights without a word.
    const base = join(scratch, 'base_with_broken_adapter_config');
    cpSync(LORA_BASE, base, { recursive: true });
    writeFileSync(join(base, 'adapter_config.json'), '{"r": 4, "lora_alpha": 8');
    const page = await openPage();
    await page.setInputFiles('#files-input', LORA);
    await page.setInputFiles('#base-input', base);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    assert.match(await errorText(page), /adapter_config\.json: bad configuration: not valid JSON/);
    assert.ok(await page.isDisabled('#convert'));
    const cli = () => execFileSync(NATIVE, ['convert', LORA, join(scratch, 'out'), '--base', base], { stdio: 'pipe' });
    assert.throws(cli, (e) => /error\[config\]: .*adapter_config\.json: bad configuration/.test(e.stderr.toString()));
    await page.clean();
  });

  test('cancel stops the worker and deletes the partial files; only .partial names exist mid-way', async () => {
    // ?hold=4: the engine stops after four pieces (some data on disk) until cancelled, so the job cannot finish
    // before Cancel is clicked however fast or loaded the machine is.
    const page = await openPage('?hold=4');
    await page.setInputFiles('#files-input', bigPt);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
    const before = await opfs(page);
    await page.click('#convert');
    await page.waitForFunction(() => document.getElementById('progress').value > 0);
    const midway = await newInOpfs(page, before);
    assert.equal(midway.length, 1);
    assert.match(midway[0].path, /^[^/]+\/\.model\.safetensors\.partial$/);
    assert.equal(await waitState(page, ['converting', 'done']), 'converting', 'finished before it could be cancelled');
    await page.click('#cancel');
    assert.equal(await waitState(page, ['cancelled']), 'cancelled');
    assert.match(await page.textContent('#status'), /Cancelled/);
    assert.deepEqual(await newInOpfs(page, before), []);
    assert.ok(await page.isEnabled('#convert'));
    await page.clean();
  });

  test('an input that breaks mid-way fails with a message and leaves nothing in OPFS', async () => {
    // Held after four pieces, so the file changes while the job is surely still reading it.
    const page = await openPage('?hold=4');
    const victim = join(scratch, 'changing.pt');
    copyFileSync(bigPt, victim);
    await page.setInputFiles('#files-input', victim);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
    const before = await opfs(page);
    await page.click('#convert');
    await page.waitForFunction(() => document.getElementById('progress').value > 0);
    assert.equal((await newInOpfs(page, before)).length, 1);
    // The file changes under the browser: its File snapshot no longer reads.
    truncateSync(victim, Math.floor(statSync(victim).size / 2));
    await page.evaluate(() => window.ckptconvTest.release());
    assert.equal(await waitState(page, ['failed', 'done']), 'failed');
    assert.match(await errorText(page), /changing\.pt/);
    assert.deepEqual(await newInOpfs(page, before), []);
    await page.clean();
  });

  test('a reload sweeps the folders of jobs no tab holds any more', async () => {
    const page = await openPage();
    await page.setInputFiles('#files-input', PT);
    const { job } = await convertOnPage(page);
    const url = page.url();
    await page.reload();
    assert.equal(url, page.url());
    // list() skips what the sweep deletes while it walks.
    await page.waitForFunction(
      async (id) => !(await window.ckptconvTest.list()).some((f) => f.path.startsWith(`${id}/`)),
      job.id,
      { polling: 100, timeout: 10_000 },
    );
    await page.clean();
  });

  test('keyboard: the drop zone is focusable and Enter opens the file chooser', async () => {
    const page = await openPage();
    // Listen before focusing: Playwright turns on file-chooser interception asynchronously.
    const opened = page.waitForEvent('filechooser', { timeout: 10_000 });
    await page.focus('#drop');
    await page.keyboard.press('Enter');
    assert.ok((await opened).isMultiple());
    await page.clean();
  });

  test('screenshots before, during and after a 400 MB conversion, in bounded wasm memory', async () => {
    const dir = process.env.UPDATE_SCREENSHOTS ? join(ROOT, 'web/screenshots') : join(scratch, 'screenshots');
    mkdirSync(dir, { recursive: true });
    const page = await openPage();
    await page.setInputFiles('#files-input', bigPt);
    assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
    await page.screenshot({ path: join(dir, 'before.png') });
    await page.click('#convert');
    await page.waitForFunction(() => document.getElementById('progress').value > 0.3);
    await page.locator('#convert-title').scrollIntoViewIfNeeded();
    await page.screenshot({ path: join(dir, 'during.png') });
    assert.equal(await waitState(page, ['done', 'failed']), 'done', await errorText(page));
    await page.locator('#outputs-section').scrollIntoViewIfNeeded();
    await page.screenshot({ path: join(dir, 'after.png') });
    for (const name of ['before', 'during', 'after']) assert.ok(statSync(join(dir, `${name}.png`)).size > 0);
    // The engine streams: a 400 MB conversion stays far below the 128 MiB budget of wasm memory.
    const { run } = await page.evaluate(() => window.ckptconvTest.job());
    assert.ok(run.memoryBytes < 128 * 2 ** 20, `wasm memory grew to ${run.memoryBytes} bytes`);
    await page.clean();
  });
});

// "Download all as .zip": one archive of every output, folders kept, for browsers without showDirectoryPicker.
describe('the .zip download', () => {
  beforeEach((t) => startTest(t.name));

  // zipfile's view of an archive: testzip's verdict, and per entry its sha256, method and flags.
  const READ_ZIP = `
import hashlib, json, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    print(json.dumps({'bad': z.testzip(), 'entries': {i.filename: [hashlib.sha256(z.read(i)).hexdigest(),
        i.compress_type, i.flag_bits] for i in z.infolist()}}))
`;

  /** A tab on the page as Firefox or Safari shows it: no showDirectoryPicker. */
  async function openPageWithoutPicker(query = '') {
    const page = await openPage(query);
    await page.addInitScript(() => {
      delete window.showDirectoryPicker;
      delete Window.prototype.showDirectoryPicker;
    });
    await page.reload();
    assert.equal(await page.evaluate(() => typeof window.showDirectoryPicker), 'undefined');
    return page;
  }

  /**
   * Clicks "Download all as .zip" and checks the archive (zipfile's testzip, `unzip -t` when installed, STORED
   * entries with UTF-8 names); returns its suggested file name, {entry name: sha256} and the status lines shown.
   */
  async function downloadZip(page) {
    await page.evaluate(() => {
      window.zipStatus = [];
      new MutationObserver(() => window.zipStatus.push(document.getElementById('status').textContent)).observe(
        document.getElementById('status'),
        { childList: true, characterData: true, subtree: true },
      );
    });
    assert.ok(await page.isVisible('#download-zip'));
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download-zip')]);
    const path = await download.path();
    const read = JSON.parse(execFileSync(PYTHON, ['-c', READ_ZIP, path], { encoding: 'utf8' }));
    assert.equal(read.bad, null);
    for (const [name, [, method, flags]] of Object.entries(read.entries)) {
      assert.equal(method, 0, `${name} is STORED`);
      assert.equal(flags, 0x0800, `${name}: a UTF-8 name, no data descriptor`);
    }
    if (spawnSync('unzip', ['-v'], { stdio: 'ignore' }).status === 0) {
      const r = spawnSync('unzip', ['-t', path], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stdout + r.stderr);
    }
    const hashes = Object.entries(read.entries).map(([name, [hash]]) => [name, hash]);
    return {
      name: download.suggestedFilename(),
      hashes: Object.fromEntries(hashes.sort(([a], [b]) => a.localeCompare(b))),
      status: await page.evaluate(() => window.zipStatus),
    };
  }

  test('without showDirectoryPicker, a Megatron TP=2 folder downloads as one .zip equal to `mg2hf`', async () => {
    const page = await openPageWithoutPicker();
    await page.setInputFiles('#folder-input', MEGATRON);
    await page.setInputFiles('#base-input', BASE);
    const { hashes } = await convertOnPage(page);
    const native = hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE));
    assert.deepEqual(hashes, native);
    assert.ok(await page.isHidden('#save-folder'), '"Save all to a folder" needs showDirectoryPicker');
    const zip = await downloadZip(page);
    // Named after the input folder, as the output folder would be.
    assert.equal(zip.name, `${basename(MEGATRON)}-hf.zip`);
    assert.deepEqual(zip.hashes, native);
    assert.equal(zip.status[0], 'Preparing the .zip… 0%');
    assert.ok(zip.status.includes('Preparing the .zip… 100%'), zip.status.join(' | '));
    const files = Object.keys(native).length;
    const done = new RegExp(`^Downloading actor-hf\\.zip \\(${files} files, [\\d.]+ [KMG]?B\\)\\.$`);
    assert.match(zip.status.at(-1), done);
    await page.clean();
  });

  test('a LoRA adapter export downloads as one .zip that keeps lora_adapter/ and equals the CLI output', async () => {
    const page = await openPageWithoutPicker();
    await page.setInputFiles('#files-input', LORA);
    await page.setInputFiles('#base-input', LORA_BASE);
    await page.selectOption('select[name=lora]', 'adapter');
    const { hashes } = await convertOnPage(page);
    // As in the LoRA test above: the CLI gets the base as a bare folder name, as the page does.
    const args = ['convert', LORA, 'OUT', '--lora', 'adapter', '--base', basename(LORA_BASE)];
    const native = hashTree(await nativeOutputIn(dirname(LORA_BASE), ...args));
    assert.deepEqual(hashes, native);
    const zip = await downloadZip(page);
    assert.equal(zip.name, 'full_weights-hf.zip');
    assert.ok('lora_adapter/adapter_model.safetensors' in zip.hashes, Object.keys(zip.hashes).join(', '));
    assert.ok('lora_adapter/adapter_config.json' in zip.hashes);
    assert.deepEqual(zip.hashes, native);
    await page.clean();
  });

  test('one output shows no .zip button; shards kept as Blobs (?store=memory) zip, once per conversion', async () => {
    const page = await openPage('?store=memory');
    await page.setInputFiles('#files-input', PT);
    await convertOnPage(page);
    assert.ok(await page.isHidden('#download-zip'), 'one output: its own link is enough');

    await page.fill('input[name=maxShardSize]', '100KB');
    await page.dispatchEvent('#options', 'change');
    const { job, hashes } = await convertOnPage(page);
    assert.equal(job.store, 'memory');
    assert.ok(job.outputs.length > 2, 'the fixture should shard');
    const zip = await downloadZip(page);
    assert.equal(zip.name, `${basename(PT, '.pt')}-hf.zip`);
    assert.deepEqual(zip.hashes, hashes);
    assert.deepEqual(zip.hashes, hashTree(await nativeOutput('convert', PT, 'OUT', '--max-shard-size', '100KB')));
    // A second click hands over the same archive without summing the outputs again.
    const again = await downloadZip(page);
    assert.deepEqual(again.hashes, zip.hashes);
    assert.deepEqual(again.status, []);
    await page.clean();
  });
});

// Inputs from URLs: a file by the URL field, folders by manifest URLs (`?url=`, `?base=`), read by the engine's
// worker with Range requests from the range server (tests/ on another port: another origin, allowed by CORS and the
// page's connect-src), byte-identical to the CLI on the same files, also over dropped connections; a server that
// ignores Range fails clearly, leaving nothing in OPFS.
describe('URL inputs', () => {
  const TESTS = join(ROOT, 'tests');
  let files;

  before(async () => {
    files = await serveFiles(TESTS);
  });

  after(async () => {
    await files?.close();
  });

  beforeEach((t) => {
    startTest(t.name);
    files.mode = 'normal';
    files.reset();
  });

  const rel = (abs) => relative(TESTS, abs);
  const urlOf = (abs) => files.urlOf(rel(abs));
  const manifestOf = (abs) => `${files.url}${MANIFEST_PREFIX}/${rel(abs)}`;
  const openUrlPage = (query = '') => openPage(query, { allow: [files.url] });
  const q = (params) => `?${new URLSearchParams(params)}`;

  test('a .pt by the URL field (label, Enter) converts byte-identically to the CLI; copies read by Range', async () => {
    const page = await openUrlPage();
    await page.getByLabel('Or a URL').fill(urlOf(PT));
    await page.getByLabel('Or a URL').press('Enter');
    assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
    // Planning and the safety scan (two workers) each read the headers; count what converting fetches.
    await page.waitForFunction(() => !document.getElementById('scan-box').hidden);
    files.reset();
    const { job, hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('convert', PT, 'OUT')));
    const summary = await page.textContent('#input-summary');
    assert.equal(summary, `qwen2_tiny_full_weights.pt (${formatBytes(statSync(PT).size)}) from ${urlOf(PT)}`);
    // The f32 tensors pass unchanged: read in the engine's worker and written as they are.
    const tensorBytes = Number((await page.getAttribute('#tensors-total', 'title')).replace(/\D/g, ''));
    assert.equal(job.run.copiedBytes, tensorBytes, JSON.stringify(job.run));
    // Converting asked only for ranges of the file: the tensors (once each) and what the engine reads around them.
    assert.ok(files.log.every((e) => e.range && e.status === 206), JSON.stringify(files.log.slice(0, 5)));
    const sent = files.bytesSent(rel(PT));
    assert.ok(sent >= tensorBytes && sent < statSync(PT).size, `${sent} bytes fetched, ${tensorBytes} of tensors`);
    // The Open button does the same.
    files.reset();
    await page.fill('#url-input', urlOf(HOSTILE));
    await page.click('#url-open');
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    assert.match(await page.textContent('#input-summary'), /^pickle_os_system\.pt \(.*\) from http:/);
    await page.clean();
  });

  for (const store of ['opfs', 'memory']) {
    test(`a DCP folder by \`?url=\` of a manifest endpoint matches the CLI (store: ${store})`, async () => {
      const url = manifestOf(DCP);
      const page = await openUrlPage(q(store === 'memory' ? { url, store } : { url }));
      const { job, hashes } = await convertOnPage(page);
      assert.equal(job.store, store);
      // The shards pass unchanged: copies of URL ranges, read in the engine's worker.
      assert.ok(job.run.copiedBytes > 0, JSON.stringify(job.run));
      assert.deepEqual(hashes, hashTree(await nativeOutput('convert', DCP, 'OUT')));
      assert.equal(await page.inputValue('#url-input'), url);
      const count = files.manifest(rel(DCP)).length; // the shards and .metadata
      const summary = await page.textContent('#input-summary');
      assert.equal(summary, `${count} files in dcp_checkpoint/ from the manifest ${url}`);
      await page.clean();
    });
  }

  test('a Megatron folder and its base, both from manifests (`?url=`, `?base=`), match `ckptconv mg2hf`', async () => {
    const page = await openUrlPage(q({ url: manifestOf(MEGATRON), base: manifestOf(BASE) }));
    const { hashes } = await convertOnPage(page);
    const native = hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE));
    assert.ok('config.json' in native && 'tokenizer.json' in native);
    assert.deepEqual(hashes, native);
    assert.equal(await page.inputValue('#base-url-input'), manifestOf(BASE));
    const baseSummary = await page.textContent('#base-summary');
    assert.match(baseSummary, new RegExp(`^\\d+ files in base_hf/ from the manifest ${manifestOf(BASE)}$`));
    await page.clean();
  });

  test('a Megatron folder by URL asks for its base; the base URL field (Enter) then plans it', async () => {
    const page = await openUrlPage(q({ url: manifestOf(MEGATRON) }));
    assert.equal(await waitState(page, ['ready', 'invalid', 'needs-base']), 'needs-base');
    assert.match(await page.textContent('#plan-status'), /give the URL of its manifest there/);
    // A file is no base: the field says so, naming the URL.
    await page.getByLabel('Base model URL (manifest)').fill(urlOf(PT));
    await page.getByLabel('Base model URL (manifest)').press('Enter');
    assert.equal(await waitState(page, ['invalid']), 'invalid');
    assert.match(await errorText(page), new RegExp(`${urlOf(PT)}: not a folder manifest`));
    await page.getByLabel('Base model URL (manifest)').fill(manifestOf(BASE));
    await page.getByLabel('Base model URL (manifest)').press('Enter');
    const { hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE)));
    await page.clean();
  });

  test("in 'drop' mode (connections cut mid-body) the conversion still succeeds byte-identically", async () => {
    files.mode = 'drop';
    const page = await openUrlPage(q({ url: manifestOf(MEGATRON), base: manifestOf(BASE) }));
    const { hashes } = await convertOnPage(page);
    assert.deepEqual(hashes, hashTree(await nativeOutput('mg2hf', MEGATRON, 'OUT', BASE)));
    assert.ok(files.drops() > 0, 'no connection was dropped');
    await page.clean();
  });

  test('a server that ignores Range: an error naming the URL, planning and mid-way; nothing left in OPFS', async () => {
    // Planning: the engine's first read of the file.
    files.mode = 'ignore-range';
    let page = await openUrlPage(q({ url: urlOf(PT) }));
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    let error = await errorText(page);
    assert.ok(error.includes(`${urlOf(PT)}: the server ignored the Range header`), error);
    assert.ok(await page.isDisabled('#convert'));
    await page.clean();

    // Mid-way: planned over a good server, which then ignores Range after two pieces are on disk.
    files.mode = 'normal';
    page = await openUrlPage(q({ url: urlOf(PT), hold: 2 }));
    assert.equal(await waitState(page, ['ready', 'invalid']), 'ready', await errorText(page));
    const before = await opfs(page);
    await page.click('#convert');
    await page.waitForFunction(() => document.getElementById('progress').value > 0);
    assert.equal((await newInOpfs(page, before)).length, 1);
    files.mode = 'ignore-range';
    await page.evaluate(() => window.ckptconvTest.release());
    assert.equal(await waitState(page, ['failed', 'done']), 'failed');
    error = await errorText(page);
    assert.ok(error.includes(`${urlOf(PT)}: the server ignored the Range header`), error);
    assert.deepEqual(await newInOpfs(page, before), []);
    await page.clean();
  });

  test('a pickle by URL gets the safety scan: the hostile one is marked dangerous', async () => {
    const page = await openUrlPage(q({ url: urlOf(HOSTILE) }));
    await page.waitForFunction(() => !document.getElementById('scan-box').hidden);
    assert.equal(await page.getAttribute('#scan-box', 'data-dangerous'), 'true');
    assert.match(await page.textContent('#scan-verdict'), /^Dangerous: it names 1 global\(s\) off/);
    assert.match(await page.textContent('#scan-weights-only'), /would refuse it: os\.system/);
    const cli = JSON.parse(spawnSync(NATIVE, ['scan', HOSTILE, '--json'], { encoding: 'utf8' }).stdout);
    const rows = await page.$$eval('#scan-globals tbody tr', (trs) => trs.map((tr) => tr.cells[0].textContent));
    assert.deepEqual(rows, cli.globals.map((g) => g.name));
    // The plan is refused too, naming the file as the URL names it.
    assert.equal(await waitState(page, ['ready', 'invalid']), 'invalid');
    assert.match(await errorText(page), /^Error: pickle_os_system\.pt: /);
    await page.clean();
  });

  test('a bad manifest or an unreachable URL is refused naming the URL; nothing is planned', async () => {
    const page = await openUrlPage();
    const notAList = urlOf(join(TESTS, 'hostile/expected.json'));
    for (const [url, message] of [
      [notAList, `Error: ${notAList}: not a folder manifest: expected a JSON array of {"path", "url"} objects`],
      [
        `${files.url}${MANIFEST_PREFIX}/nope`,
        `Error: ${files.url}${MANIFEST_PREFIX}/nope: the server answered 404 (not found)`,
      ],
      ['ftp://example.com/x.pt', 'Error: ftp: URLs cannot be read: give an http:// or https:// address'],
      // The page's CSP lets plain http reach this machine only: said at once, not after a blocked fetch.
      [
        'http://example.com/x.pt',
        'Error: http://example.com/x.pt: plain http:// is read only from this machine (localhost, 127.0.0.1): ' +
          'give an https:// address',
      ],
    ]) {
      await page.fill('#url-input', url);
      await page.press('#url-input', 'Enter');
      const shown = (m) => document.getElementById('error').textContent === m;
      await page.waitForFunction(shown, message, { timeout: 10_000 });
      assert.equal(await page.evaluate(() => document.body.dataset.state), 'invalid');
      assert.ok(await page.isDisabled('#convert'));
      assert.ok(await page.isHidden('#plan'));
    }
    await page.clean();
  });
});

