// The OPFS writer: a worker nested in the engine worker (sync access handles exist only in workers), so writing one
// chunk overlaps with the engine producing the next. It owns the job folder `ckptconv-jobs/<jobId>/`: files are
// written as `.NAME.partial` and renamed only after the last byte of the last file, so nothing half-written ever
// looks finished. Messages are handled strictly in order; each data chunk is acknowledged once on disk.
//
// Bytes that go to the output unchanged arrive as `copy` requests (a range of an input Blob): a pool of copier
// workers (copier.js) reads and writes those in COPY_CHUNK pieces, each through its own shared handle on the output,
// so that several reads from the browser and writes to disk are under way at once; the request is acknowledged
// ('copied') when all its pieces are on disk. Where shared handles are missing (they came in Chromium 121), the
// writer copies the range itself.
import { readPieces } from './blobread.js';
import { JOBS } from './opfs.js';

// Measured on the 3.55 GB bench (bench/bench_web.mjs, two cores): with copiers that write every 1 MiB as it arrives,
// 32 MiB requests to 8 copiers (3.46 s) tied with 64 x 8 (3.52 s) and 16 x 6 (3.46 s), ahead of 64 x 4 (3.8 s)
// and 16 x 4 (4.8 s); more copiers keep more of the browser's file reads under way at once.
const COPY_CHUNK = 32 << 20;
const COPIERS = 8;

let jobs, dir, canRename;
let cur = null;
const finished = [];
let queue = Promise.resolve();
let failed = false;
let pool = null;

function fail(e) {
  if (failed) return;
  failed = true;
  postMessage({ type: 'error', message: e instanceof Error ? e.message : String(e) });
}

self.onmessage = ({ data }) => {
  queue = queue.then(async () => {
    if (failed && data.type !== 'abort') return;
    try {
      await handle(data);
    } catch (e) {
      fail(e);
    }
  });
};

/** A pool of `size` copiers: send() runs one request on the least-loaded copier and resolves with its answer. */
function copiers(size) {
  const workers = Array.from({ length: size }, () => {
    const w = new Worker(new URL('./copier.js', import.meta.url), { type: 'module' });
    const c = { w, load: 0, waiting: new Map() };
    w.onmessage = ({ data }) => {
      const p = c.waiting.get(data.id);
      c.waiting.delete(data.id);
      if (data.type === 'error') p?.reject(new Error(data.message));
      else p?.resolve(data.bytes);
    };
    w.onerror = (e) => {
      const err = new Error(`a copier failed: ${e.message || 'could not start'}`);
      for (const p of c.waiting.values()) p.reject(err);
      c.waiting.clear();
    };
    return c;
  });
  let next = 0;
  const post = (c, msg, load) => {
    const id = next++;
    c.load += load;
    return new Promise((resolve, reject) => {
      c.waiting.set(id, { resolve, reject });
      c.w.postMessage({ ...msg, id });
    }).finally(() => (c.load -= load));
  };
  return {
    send(msg) {
      const c = workers.reduce((a, b) => (b.load < a.load ? b : a));
      return post(c, msg, msg.len);
    },
    /** Every copier closes its handle on `key` (before the writer renames or reads back that file). */
    close: (key) => Promise.all(workers.map((c) => post(c, { type: 'close', key }, 0))),
    terminate: () => workers.forEach((c) => c.w.terminate()),
  };
}

/** Queues the copy of `len` bytes of `file` (the input `name`) from `offset` to the current output's position. */
function copy(file, name, offset, len) {
  const at = cur.at;
  cur.at += len;
  if (!cur.shared) {
    for (const [bytes, done] of readPieces(file, name, offset, len, COPY_CHUNK)) {
      if (cur.access.write(bytes, { at: at + done }) !== bytes.length) {
        throw new Error(`short write to ${cur.name} (browser storage full?)`);
      }
      postMessage({ type: 'progress', bytes: bytes.length });
    }
    postMessage({ type: 'copied' });
    return;
  }
  // A shared handle implies a pool (see 'begin').
  const pieces = [];
  for (let done = 0; done < len; done += COPY_CHUNK) {
    const n = Math.min(COPY_CHUNK, len - done);
    const msg = { type: 'chunk', key: cur.name, handle: cur.handle, file, name, from: offset + done, len: n };
    pieces.push(pool.send({ ...msg, at: at + done }).then((bytes) => postMessage({ type: 'progress', bytes })));
  }
  const all = Promise.all(pieces).then(() => postMessage({ type: 'copied' }));
  all.catch(fail);
  cur.pending.push(all);
}

/** Output names come from the engine; still, never let one climb out of the job folder. */
function splitName(name) {
  const parts = name.split('/');
  if (parts.some((p) => p === '' || p === '.' || p === '..')) throw new Error(`bad output name '${name}'`);
  return { dirs: parts.slice(0, -1), base: parts[parts.length - 1] };
}

async function handle(msg) {
  switch (msg.type) {
    case 'start': {
      // Sent first, when the page shows a plan: the copiers start up while the user looks at it.
      const size = msg.copiers ?? COPIERS;
      if (size > 0) pool = copiers(size);
      return;
    }
    case 'open': {
      jobs = await (await navigator.storage.getDirectory()).getDirectoryHandle(JOBS, { create: true });
      dir = await jobs.getDirectoryHandle(msg.jobId, { create: true });
      // Without move() (older engines) files get their final names at once; the page deletes the folder on failure.
      canRename = typeof FileSystemFileHandle.prototype.move === 'function';
      return;
    }
    case 'begin': {
      const { dirs, base } = splitName(msg.name);
      let d = dir;
      for (const p of dirs) d = await d.getDirectoryHandle(p, { create: true });
      const handle = await d.getFileHandle(canRename ? `.${base}.partial` : base, { create: true });
      // A shared handle lets the copiers write into the same file; engines without them ignore the mode.
      const access = await handle.createSyncAccessHandle({ mode: 'readwrite-unsafe' });
      // Reserving the full size first turns a full disk into an early, clear error.
      access.truncate(msg.size);
      const shared = pool !== null && access.mode === 'readwrite-unsafe';
      cur = { name: msg.name, base, size: msg.size, handle, access, at: 0, shared, pending: [] };
      return;
    }
    case 'copy':
      return copy(msg.file, msg.name, msg.offset, msg.len);
    case 'data': {
      const n = cur.access.write(msg.bytes, { at: cur.at });
      if (n !== msg.bytes.length) throw new Error(`short write to ${cur.name} (browser storage full?)`);
      cur.at += n;
      postMessage({ type: 'written', bytes: n });
      return;
    }
    case 'end': {
      if (cur.at !== cur.size) throw new Error(`internal: ${cur.name} got ${cur.at} of ${cur.size} bytes`);
      await Promise.all(cur.pending);
      if (pool && cur.shared) await pool.close(cur.name);
      // No flush(): it is an fsync, seconds for a multi-GB file, and the CLI does not fsync either; close() hands
      // the bytes to the OS, and the rename still happens only after every file is closed.
      cur.access.close();
      finished.push(cur);
      cur = null;
      return;
    }
    case 'finish': {
      pool?.terminate();
      pool = null;
      if (canRename) for (const f of finished) await f.handle.move(f.base);
      postMessage({ type: 'finished' });
      return;
    }
    case 'abort': {
      pool?.terminate();
      try {
        cur?.access.close();
      } catch {}
      await jobs?.removeEntry(msg.jobId, { recursive: true }).catch(() => {});
      postMessage({ type: 'aborted' });
    }
  }
}
