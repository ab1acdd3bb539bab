// The page's side of the output manifest (tests/manifest.py has the CLI's): sha256 of every output each page
// conversion writes, per test and call, checked against tests/manifest/page.json, or recorded there with
// CKPTCONV_MANIFEST=record (run twice; outputs that differ between runs are dropped as unstable).
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { ROOT } from './harness.mjs';

const FILE = join(ROOT, 'tests/manifest/page.json');
const MODE = process.env.CKPTCONV_MANIFEST ?? 'check';
const calls = new Map();
const recorded = {};
let current = '?';

/** Names the test whose conversions follow. */
export function startTest(name) {
  current = name;
}

/** Records or checks one conversion's {output name: sha256}. */
export function recordPage(hashes) {
  const n = calls.get(current) ?? 0;
  calls.set(current, n + 1);
  const key = `${current}#${n}`;
  if (MODE === 'record') {
    recorded[key] = hashes;
    return;
  }
  const committed = existsSync(FILE) ? JSON.parse(readFileSync(FILE, 'utf8')) : { runs: {}, unstable: [] };
  const want = committed.runs[key];
  if (want === undefined || committed.unstable.includes(key)) return;
  assert.deepEqual(hashes, want, `output manifest: ${key} wrote other bytes than tests/manifest/page.json records`);
}

process.on('exit', () => {
  if (MODE !== 'record' || Object.keys(recorded).length === 0) return;
  const prev = existsSync(FILE) ? JSON.parse(readFileSync(FILE, 'utf8')) : { runs: {}, unstable: [] };
  const unstable = new Set(prev.unstable);
  const runs = { ...prev.runs };
  for (const [k, v] of Object.entries(recorded)) {
    if (k in runs && JSON.stringify(runs[k]) !== JSON.stringify(v)) unstable.add(k);
    runs[k] = v;
  }
  const sorted = Object.fromEntries(Object.entries(runs).sort(([a], [b]) => (a < b ? -1 : 1)));
  mkdirSync(dirname(FILE), { recursive: true });
  writeFileSync(FILE, `${JSON.stringify({ runs: sorted, unstable: [...unstable].sort() }, null, 1)}\n`);
});
