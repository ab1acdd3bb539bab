// Human-readable numbers for the page: sizes in decimal units (as HF's "5GB" and the CLI's MB/s use), durations,
// and the progress line (bytes, MB/s, ETA); and displaySafe, which every string from a checkpoint goes through.

export function formatBytes(n) {
  if (!Number.isFinite(n)) return '?';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${units[i]}`;
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 1) return '<1 s';
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** "1.20 GB of 3.55 GB · 310 MB/s · 8 s left" from bytes done, total and elapsed milliseconds. */
export function progressLine(done, total, ms) {
  const rate = ms > 0 ? done / (ms / 1000) : 0;
  const eta = rate > 0 ? (total - done) / rate : NaN;
  const parts = [`${formatBytes(done)} of ${formatBytes(total)}`];
  if (ms > 300) parts.push(`${formatBytes(rate)}/s`, `${formatDuration(eta)} left`);
  return parts.join(' · ');
}

/** A tensor shape as torch prints it: [151936, 1536]; a 0-dim tensor is []. */
export function formatShape(shape) {
  return `[${shape.join(', ')}]`;
}

// What must not be shown as itself (the core's is_unsafe_char in src/error.rs, the same set): controls (C0, DEL,
// C1), bidi overrides, embeddings, isolates and marks, and invisible characters (zero-width, BOM, soft hyphen,
// Hangul fillers, interlinear annotations, tag characters, line and paragraph separators).
const UNSAFE =
  /[\u{0}-\u{1f}\u{7f}-\u{9f}\u{ad}\u{61c}\u{115f}\u{1160}\u{180e}\u{200b}-\u{200f}\u{2028}-\u{202e}\u{2060}-\u{2064}\u{2066}-\u{206f}\u{3164}\u{feff}\u{ffa0}\u{fff9}-\u{fffb}\u{e0000}-\u{e007f}]/gu;

/**
 * A name or message from a checkpoint as the page shows it: each unsafe character as a visible escape (`\x1b`,
 * `\u{202e}`), as the CLI prints it; everything else (ASCII, non-ASCII letters) unchanged. The engine's JSON stays
 * exact; textContent already keeps HTML out, this keeps a name from reordering or hiding what is around it.
 */
export function displaySafe(text) {
  return String(text).replace(UNSAFE, (c) => {
    const cp = c.codePointAt(0);
    return cp < 0x80 ? `\\x${cp.toString(16).padStart(2, '0')}` : `\\u{${cp.toString(16)}}`;
  });
}
