// Unit tests of the page's input collection (web/www/entries.js) in Node, with fake FileSystemEntry objects:
// a synthetic drop in a real browser has no entries, so the folder walk is tested here.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { describeFiles, filesFromDrop, filesFromInput, walkEntry } from '../www/entries.js';
import { formatBytes } from '../www/format.js';

const fakeFile = (name, size = 1) => ({ name, size });

/** A fake directory entry whose reader hands out at most `batch` children per readEntries call, like Chromium. */
function dir(fullPath, children, batch = 100) {
  return {
    isFile: false,
    isDirectory: true,
    fullPath,
    createReader() {
      let at = 0;
      return {
        readEntries(ok) {
          const slice = children.slice(at, at + batch);
          at += slice.length;
          setTimeout(() => ok(slice));
        },
      };
    },
  };
}

function file(fullPath) {
  return {
    isFile: true,
    isDirectory: false,
    fullPath,
    file: (ok) => setTimeout(() => ok(fakeFile(fullPath.split('/').pop()))),
  };
}

test('a dropped folder is walked recursively, past the 100-entries-per-call limit, keeping relative paths', async () => {
  const shards = Array.from({ length: 250 }, (_, i) => file(`/ckpt/dcp/__${i}_0.distcp`));
  const root = dir('/ckpt', [file('/ckpt/.metadata'), dir('/ckpt/dcp', shards), dir('/ckpt/empty', [])]);
  const out = await walkEntry(root, []);
  assert.equal(out.length, 251);
  assert.deepEqual(out[0].path, 'ckpt/.metadata');
  assert.equal(out[0].file.name, '.metadata');
  assert.equal(out.at(-1).path, 'ckpt/dcp/__249_0.distcp');
  assert.equal(new Set(out.map((f) => f.path)).size, 251);
});

test('a drop takes entries synchronously, and falls back to plain files when there are none', async () => {
  const folder = dir('/run', [file('/run/a.pt')]);
  const plain = fakeFile('weights.pt', 5);
  let handlerDone = false;
  const items = [
    { kind: 'file', webkitGetAsEntry: () => (assert.ok(!handlerDone), folder), getAsFile: () => null },
    { kind: 'file', webkitGetAsEntry: () => null, getAsFile: () => (assert.ok(!handlerDone), plain) },
    { kind: 'string', webkitGetAsEntry: () => assert.fail('strings are not files'), getAsFile: () => null },
  ];
  const pending = filesFromDrop({ items, files: [] });
  handlerDone = true;
  assert.deepEqual(
    (await pending).map((f) => f.path),
    ['run/a.pt', 'weights.pt'],
  );
});

test('folder inputs keep webkitRelativePath; the summary names the folder', () => {
  const files = filesFromInput([
    { name: 'config.json', webkitRelativePath: 'base_hf/config.json', size: 600 },
    { name: 'model.safetensors', webkitRelativePath: 'base_hf/model.safetensors', size: 2_000_000 },
  ]);
  assert.deepEqual(
    files.map((f) => f.path),
    ['base_hf/config.json', 'base_hf/model.safetensors'],
  );
  assert.equal(describeFiles(files, formatBytes), '2 files, 2.00 MB in base_hf/');
  assert.equal(describeFiles(filesFromInput([fakeFile('x.pt', 1500)]), formatBytes), 'x.pt (1.50 KB)');
});
