// Issue #16's pickle policy on the page: every gadget of tests/security/gadgets.py and 20 public corpus files
// (tests/security/fetch_corpora.py) are refused with the CLI's own message, naming the same globals, and nothing is
// written. tests/security/policy_cases.py builds the sample and records the native CLI's verdict (`inspect`, which
// is what the page does with an input) in a JSON file; each input is given to a fresh page (a folder through the
// folder input, a Megatron case with its base folder) and its error text compared with the CLI's message (the CLI
// names the file by its path, the page by the dropped file's or folder's name: the parent folder is taken off).
// Whether the CLI's verdict is the right one is tests/e2e/test_pickle_policy.py's concern; here the CLI must refuse
// (exit 1) and the page must agree.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { PYTHON, ROOT, ensureBuilt, launch } from './harness.mjs';
import { PAGE_MOUNTS, serve } from './serve.mjs';

let server, browser, scratch, cases;

before(async () => {
  ensureBuilt();
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-policy-test-'));
  execFileSync(PYTHON, [join(ROOT, 'tests/security/policy_cases.py'), scratch], { stdio: 'pipe', maxBuffer: 64 << 20 });
  cases = JSON.parse(readFileSync(join(scratch, 'cases.json'), 'utf8'));
  server = await serve(PAGE_MOUNTS);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** The names among `names` that `text` spells as whole dotted names (tests/security/policy.py's named()). */
function named(text, names) {
  const esc = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return names.filter((n) => new RegExp(`(?<![\\w])(?<![\\w]\\.)${esc(n)}(?![\\w])(?!\\.\\w)`).test(text)).sort();
}

describe('the pickle policy on the page', () => {
  test('the sample holds every gadget and 20 corpus files', () => {
    assert.ok(cases.filter((c) => c.id.startsWith('gadget/')).length >= 30);
    assert.equal(cases.filter((c) => c.id.startsWith('corpus/')).length, 20);
  });

  test('each input is refused with the CLI message, the same globals named, nothing written', async () => {
    const failures = [];
    for (const c of cases) {
      const page = await browser.context.newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(server.url);
      const before = await page.evaluate(() => window.ckptconvTest.list());
      if (c.base) await page.setInputFiles('#base-input', c.base);
      await page.setInputFiles(c.folder ? '#folder-input' : '#files-input', c.input);
      await page.waitForFunction(() => ['ready', 'invalid'].includes(document.body.dataset.state), null, {
        timeout: 120_000,
      });
      const state = await page.evaluate(() => document.body.dataset.state);
      const text = (await page.textContent('#error')) ?? '';
      const after = await page.evaluate(() => window.ckptconvTest.list());
      const problems = [];
      if (c.code !== 1) problems.push(`the CLI exits ${c.code} (it must refuse):\n${c.stderr}`);
      if (state !== 'invalid') problems.push(`the page is '${state}', not refusing`);
      const first = text.split('\n')[0];
      if (state === 'invalid' && first !== `Error: ${c.message}`)
        problems.push(`page: ${JSON.stringify(first)}\n  CLI: ${JSON.stringify(`Error: ${c.message}`)}`);
      const pageNames = named(text, c.candidates);
      if (JSON.stringify(pageNames) !== JSON.stringify(c.names))
        problems.push(`page names ${pageNames.join(', ') || 'nothing'}, the CLI ${c.names.join(', ') || 'nothing'}`);
      if (after.length !== before.length) problems.push('something was written to OPFS');
      if (errors.length) problems.push(`page errors: ${errors.join('; ')}`);
      if (problems.length) failures.push(`${c.id}:\n  ${problems.join('\n  ')}`);
      await page.close();
    }
    assert.deepEqual(failures, [], `${failures.length} of ${cases.length} inputs differ:\n${failures.join('\n')}`);
  });
});
