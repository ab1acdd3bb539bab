// The OPFS writer: a worker nested in the engine worker (sync access handles exist only in workers), so writing one
// chunk overlaps with the engine producing the next. It owns the job folder `ckptconv-jobs/<jobId>/`: files are
// written as `.NAME.partial` and renamed only after the last byte of the last file, so nothing half-written ever
// looks finished. Messages are handled strictly in order; each data chunk is acknowledged once on disk.
import { JOBS } from './opfs.js';

let jobs, dir, canRename;
let cur = null;
const finished = [];
let queue = Promise.resolve();
let failed = false;

self.onmessage = ({ data }) => {
  queue = queue.then(async () => {
    if (failed && data.type !== 'abort') return;
    try {
      await handle(data);
    } catch (e) {
      failed = true;
      postMessage({ type: 'error', message: e instanceof Error ? e.message : String(e) });
    }
  });
};

/** Output names come from the engine; still, never let one climb out of the job folder. */
function splitName(name) {
  const parts = name.split('/');
  if (parts.some((p) => p === '' || p === '.' || p === '..')) throw new Error(`bad output name '${name}'`);
  return { dirs: parts.slice(0, -1), base: parts[parts.length - 1] };
}

async function handle(msg) {
  switch (msg.type) {
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
      const access = await handle.createSyncAccessHandle();
      // Reserving the full size first turns a full disk into an early, clear error.
      access.truncate(msg.size);
      cur = { name: msg.name, base, size: msg.size, handle, access, at: 0 };
      return;
    }
    case 'data': {
      const n = cur.access.write(msg.bytes, { at: cur.at });
      if (n !== msg.bytes.length) throw new Error(`short write to ${cur.name} (browser storage full?)`);
      cur.at += n;
      postMessage({ type: 'written', bytes: n });
      return;
    }
    case 'end': {
      if (cur.at !== cur.size) throw new Error(`internal: ${cur.name} got ${cur.at} of ${cur.size} bytes`);
      // No flush(): it is an fsync, seconds for a multi-GB file, and the CLI does not fsync either; close() hands
      // the bytes to the OS, and the rename still happens only after every file is closed.
      cur.access.close();
      finished.push(cur);
      cur = null;
      return;
    }
    case 'finish': {
      if (canRename) for (const f of finished) await f.handle.move(f.base);
      postMessage({ type: 'finished' });
      return;
    }
    case 'abort': {
      try {
        cur?.access.close();
      } catch {}
      await jobs?.removeEntry(msg.jobId, { recursive: true }).catch(() => {});
      postMessage({ type: 'aborted' });
    }
  }
}
