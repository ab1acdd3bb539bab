// A copier: one of a small pool the OPFS writer (writer.js) starts, so that reading an input (a byte stream of the
// Blob, served by the browser process) and writing the output (a sync access handle) overlap across workers. Each
// request is one range: read `len` bytes of the Blob `file` (the input `name`) from `from` and write them at `at`
// into the output `key`, through this worker's own shared ('readwrite-unsafe') handle on it, opened on first use
// and closed when the writer says so. Requests are handled in order; each is answered with {type: 'done', id,
// bytes} or {type: 'error', id, message}.
const handles = new Map(); // key -> FileSystemSyncAccessHandle
let queue = Promise.resolve();
let buffer = new ArrayBuffer(0);

/** Reads the range into this copier's one reused buffer (a byte stream read in place), so no garbage piles up. */
async function readInto(file, name, from, len) {
  if (buffer.byteLength < len) buffer = new ArrayBuffer(len);
  const reader = file.slice(from, from + len).stream().getReader({ mode: 'byob' });
  let at = 0;
  try {
    while (at < len) {
      const { done, value } = await reader.read(new Uint8Array(buffer, at, len - at));
      if (done) break;
      buffer = value.buffer;
      at += value.byteLength;
    }
  } catch (e) {
    throw new Error(`${name}: reading bytes ${from}..${from + len} failed: ${e instanceof Error ? e.message : e}`);
  } finally {
    reader.releaseLock();
  }
  if (at !== len) throw new Error(`${name}: the file changed or was cut while it was being read`);
  return new Uint8Array(buffer, 0, len);
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
      const bytes = await readInto(data.file, data.name, data.from, data.len);
      const n = access.write(bytes, { at: data.at });
      if (n !== bytes.length) throw new Error(`short write to ${data.key} (browser storage full?)`);
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
