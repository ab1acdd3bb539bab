// What the browser tests and the web bench share: building what is missing (web/pkg, the native CLI), launching
// Chromium with a persistent profile (OPFS is in-memory in incognito), running the native CLI for reference
// outputs, and hashing output trees. Run by `node --test web/test/`, it checks those prerequisites.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const NATIVE = join(ROOT, 'target/release/ckptconv');
export const FIXTURES = join(ROOT, 'tests/fixtures');
export const PYTHON = join(ROOT, '.venv/bin/python');
const WASM = join(ROOT, 'web/pkg/ckptconv_web_bg.wasm');

export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
];

/** Builds web/pkg and the release CLI if they are missing (the test script normally builds both first). */
export function ensureBuilt() {
  const run = (cmd, args) => execFileSync(cmd, args, { cwd: ROOT, stdio: 'pipe', maxBuffer: 64 << 20 });
  if (!existsSync(WASM)) run('bash', ['web/build.sh']);
  if (!existsSync(NATIVE)) run('cargo', ['build', '--release']);
}

/** Chromium with a fresh persistent profile; close() also deletes the profile. */
export async function launch(options = {}) {
  const { chromium } = await import('playwright-core');
  const profile = await mkdtemp(join(tmpdir(), 'ckptconv-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
    acceptDownloads: true,
    viewport: { width: 1000, height: 760 },
    ...options,
  });
  return {
    context,
    profile,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Runs the native CLI with `args` (OUT is replaced by a fresh temp folder); returns that folder. */
export async function nativeOutput(...args) {
  return nativeOutputIn(undefined, ...args);
}

/** The same from folder `cwd`, for paths that end up in the output (a browser only knows a folder's name). */
export async function nativeOutputIn(cwd, ...args) {
  const out = join(await mkdtemp(join(tmpdir(), 'ckptconv-native-')), 'out');
  execFileSync(
    NATIVE,
    args.map((a) => (a === 'OUT' ? out : a)),
    { stdio: 'pipe', cwd },
  );
  return out;
}

export function sha256(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}

/** {relative path: sha256} of every file under `dir`. */
export function hashTree(dir) {
  const out = {};
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out[relative(dir, p)] = sha256(readFileSync(p));
    }
  };
  walk(dir);
  return Object.fromEntries(Object.entries(out).sort(([a], [b]) => a.localeCompare(b)));
}

/** Writes the ~400 MB Qwen2-shaped .pt of make_big_pt.py (real torch.save) to `path`. */
export function makeBigPt(path) {
  execFileSync(PYTHON, [join(ROOT, 'web/test/make_big_pt.py'), path], { stdio: 'pipe' });
  return path;
}

if (process.argv[1] === fileURLToPath(import.meta.url) && process.env.NODE_TEST_CONTEXT) {
  const { test } = await import('node:test');
  const assert = await import('node:assert/strict');
  test('prerequisites: web/pkg, the native CLI, Chromium and torch are there', () => {
    ensureBuilt();
    for (const p of [WASM, NATIVE, '/usr/bin/chromium', PYTHON]) assert.ok(existsSync(p), `${p} is missing`);
  });
}
