// The page's side of OPFS: one folder per conversion under `ckptconv-jobs/`, held by a Web Lock while a tab uses it,
// so a reload (or another tab) can sweep folders nobody holds; export to a user-picked folder; read-back for tests.
// The worker writes the files (sync access handles exist only in workers); see worker.js.

export const JOBS = 'ckptconv-jobs';
const LOCK = 'ckptconv-job:';

export function newJobId() {
  return `${Date.now().toString(36)}-${crypto.randomUUID().slice(0, 8)}`;
}

async function jobsDir(create = false) {
  const root = await navigator.storage.getDirectory();
  return root.getDirectoryHandle(JOBS, { create }).catch(() => null);
}

/** Holds the job's lock until the returned release() is called (or the tab goes away). */
export function holdJob(id) {
  if (!navigator.locks) return Promise.resolve(() => {});
  return new Promise((granted) => {
    navigator.locks.request(LOCK + id, () => new Promise((release) => granted(release)));
  });
}

/** Deletes a job's folder. Right after a worker is terminated its access handles may still be closing: retry. */
export async function removeJob(id) {
  const jobs = await jobsDir();
  if (!jobs) return;
  for (let attempt = 0; ; attempt++) {
    try {
      await jobs.removeEntry(id, { recursive: true });
      return;
    } catch (e) {
      if (e.name === 'NotFoundError') return;
      if (attempt >= 40) throw e;
      await new Promise((ok) => setTimeout(ok, 50));
    }
  }
}

/** Deletes the folders of jobs no tab holds: left by a closed tab, a crash or a reload. */
export async function sweepJobs() {
  const jobs = await jobsDir();
  if (!jobs || !navigator.locks) return;
  const { held = [] } = await navigator.locks.query();
  const busy = new Set(held.map((l) => l.name));
  const names = [];
  for await (const name of jobs.keys()) names.push(name);
  // Collected first: deleting while iterating a directory may skip entries.
  for (const name of names) {
    if (!busy.has(LOCK + name)) await removeJob(name).catch(() => {});
  }
}

/** The FileSystemFileHandle of output `name` (may contain `/`) of job `id`. */
export async function outputHandle(id, name) {
  let dir = await (await jobsDir()).getDirectoryHandle(id);
  const parts = name.split('/');
  const base = parts.pop();
  for (const p of parts) dir = await dir.getDirectoryHandle(p);
  return dir.getFileHandle(base);
}

/**
 * Copies the job's outputs into a folder the user picks (Chromium's showDirectoryPicker): each file streams from
 * its disk-backed OPFS File into createWritable(), so nothing is held in memory. Returns false if the user backs out.
 */
export async function saveToFolder(outputs, fileOf, onProgress) {
  let target;
  try {
    target = await window.showDirectoryPicker({ id: 'ckptconv-out', mode: 'readwrite' });
  } catch (e) {
    if (e.name === 'AbortError') return false;
    throw e;
  }
  const existing = [];
  for (const o of outputs) {
    if (await fileIn(target, o.name, false).catch(() => null)) existing.push(o.name);
  }
  if (existing.length && !confirm(`Overwrite ${existing.join(', ')} in ${target.name}?`)) return false;
  for (const [i, o] of outputs.entries()) {
    onProgress?.(i, o);
    const handle = await fileIn(target, o.name, true);
    // createWritable writes a hidden swap file and swaps it in on close: an aborted copy leaves no half file.
    await (await fileOf(o.name)).stream().pipeTo(await handle.createWritable());
  }
  return true;
}

async function fileIn(dir, name, create) {
  const parts = name.split('/');
  const base = parts.pop();
  for (const p of parts) dir = await dir.getDirectoryHandle(p, { create });
  return dir.getFileHandle(base, { create });
}

/**
 * Every file under ckptconv-jobs/ as {path, size}: the tests' view of what a conversion left behind. A page that
 * loads sweeps abandoned job folders meanwhile; whatever vanishes during the walk is simply not listed.
 */
export async function listAll() {
  const out = [];
  async function walk(dir, prefix) {
    try {
      for await (const [name, h] of dir.entries()) {
        if (h.kind === 'directory') await walk(h, `${prefix}${name}/`);
        else out.push({ path: prefix + name, size: (await h.getFile()).size });
      }
    } catch (e) {
      if (e.name !== 'NotFoundError') throw e;
    }
  }
  const jobs = await jobsDir();
  if (jobs) await walk(jobs, '');
  return out.sort((a, b) => a.path.localeCompare(b.path));
}

/** SHA-256 (hex) of a File or Blob; whole-file reads are fine for the test fixtures this serves. */
export async function sha256(blob) {
  const digest = await crypto.subtle.digest('SHA-256', await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}
