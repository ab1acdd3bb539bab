// Human-readable numbers for the page: sizes in decimal units (as HF's "5GB" and the CLI's MB/s use), durations,
// and the progress line (bytes, MB/s, ETA).

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
