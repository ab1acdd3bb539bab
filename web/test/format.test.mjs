// Unit tests of the page's displaySafe (web/www/format.js) in Node: the same escapes as the core's display_safe
// (src/error.rs), and legitimate names unchanged.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { displaySafe } from '../www/format.js';

test('legitimate names pass through unchanged', () => {
  for (const name of ['model.layers.0.self_attn.q_proj.weight', '模型.权重', 'poids.équipe', 'a\\x1b', '']) {
    assert.equal(displaySafe(name), name);
  }
});

test('controls, bidi and invisible characters become visible escapes, as the CLI prints them', () => {
  const cases = [
    ['a\x1b[2K\rOK', 'a\\x1b[2K\\x0dOK'],
    ['\0\x07\x08\t\n\x0b\x0c\x7f', '\\x00\\x07\\x08\\x09\\x0a\\x0b\\x0c\\x7f'],
    ['csi\u009b2J\u0085', 'csi\\u{9b}2J\\u{85}'],
    ['w\u202egnp.exe', 'w\\u{202e}gnp.exe'],
    ['\u2066x\u2069\u200b\u200d\u200f\ufeff\u2028', '\\u{2066}x\\u{2069}\\u{200b}\\u{200d}\\u{200f}\\u{feff}\\u{2028}'],
    ['tag\u{e0041}', 'tag\\u{e0041}'],
  ];
  for (const [raw, want] of cases) assert.equal(displaySafe(raw), want);
});
