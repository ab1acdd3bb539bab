// A copier: one of a small pool the OPFS writer (writer.js) starts, so that reading an input (a byte stream of the
// Blob, served by the browser process) and writing the output (a sync access handle) overlap across workers. Each
// request is one range: read `len` bytes of the Blob `file` (the input `name`) from `from` and write them at `at`
// into the output `key`, through this worker's own shared ('readwrite-unsafe') handle on it, opened on first use
// and closed when the writer says so. Requests are handled in order; each is answered with {type: 'done', id,
// bytes} or {type: 'error', id, message}.
const handles = new Map(); // key -> FileSystemSyncAccessHandle
let queue = Promise.resolve();
// Written as soon as it arrives, while still in the CPU's cache: 1 MiB beat 256 KiB, 4 MiB and whole 16 MiB ranges.
const PIECE = 1 << 20;
let buffer = new ArrayBuffer(PIECE);

/**
 * Streams the range into this copier's one reused buffer (a byte stream read in place, so no garbage piles up) and
 * writes each PIECE at its place in `access` (the output `key`) as soon as it is full. Returns the bytes written.
 */
async function copyRange({ file, name, from, len, key, at }, access) {
  const reader = file.slice(from, from + len).stream().getReader({ mode: 'byob' });
  const read = async (view) => {
    try {
      return await reader.read(view);
    } catch (e) {
      throw new Error(`${name}: reading bytes ${from}..${from + len} failed: ${e instanceof Error ? e.message : e}`);
    }
  };
  try {
    for (let done = 0; done < len; ) {
      const want = Math.min(PIECE, len - done);
      let got = 0;
      while (got < want) {
        const r = await read(new Uint8Array(buffer, got, want - got));
        if (r.done) throw new Error(`${name}: the file changed or was cut while it was being read`);
        buffer = r.value.buffer;
        got += r.value.byteLength;
      }
      if (access.write(new Uint8Array(buffer, 0, got), { at: at + done }) !== got) {
        throw new Error(`short write to ${key} (browser storage full?)`);
      }
      done += got;
    }
  } finally {
    reader.releaseLock();
  }
  return len;
}

self.onmessage = ({ data }) => {
  queue = queue.then(() => handle(data));
};

async function handle(data) {
  const { id } = data;
  try {
    if (data.type === 'chunk') {
      let access = handles.get(data.key);
      if (!access) {
        access = await data.handle.createSyncAccessHandle({ mode: 'readwrite-unsafe' });
        handles.set(data.key, access);
      }
      const n = await copyRange(data, access);
      postMessage({ type: 'done', id, bytes: n });
    } else if (data.type === 'close') {
      handles.get(data.key)?.close();
      handles.delete(data.key);
      postMessage({ type: 'done', id, bytes: 0 });
    }
  } catch (e) {
    postMessage({ type: 'error', id, message: e instanceof Error ? e.message : String(e) });
  }
}
