// Synchronous calls answered by another thread: the engine (wasm) reads its inputs synchronously, but URLs, Node
// Blobs and Blob-likes are read asynchronously. The engine's thread posts a request and sleeps on a shared flag
// (Atomics.wait); the thread that holds the readers (the caller's main thread, or a fetcher worker) reads, copies
// the answer into shared memory and wakes it. Needs SharedArrayBuffer: always in Node, in a browser only on a
// cross-origin-isolated page.

const ERROR_MAX = 4096;

/**
 * The sleeping side: returns `call(msg, max, view) -> Uint8Array` that posts `msg` over `port` (anything with
 * postMessage) and waits for an answer of at most `max` bytes: a copy, or with `view` the shared bytes themselves,
 * valid until the next call. Throws the answering side's error message.
 */
export function blockingCalls(port) {
  let ctl = null;
  let data = null;
  return (msg, max, view = false) => {
    // Made on first use: a browser without cross-origin isolation has no SharedArrayBuffer at all.
    ctl ??= new Int32Array(new SharedArrayBuffer(8));
    const need = Math.max(max, ERROR_MAX);
    if (!data || data.byteLength < need) data = new SharedArrayBuffer(Math.max(need, 1 << 20));
    Atomics.store(ctl, 0, 0);
    port.postMessage({ ...msg, ctl: ctl.buffer, data });
    while (Atomics.load(ctl, 0) === 0) Atomics.wait(ctl, 0, 0);
    const n = ctl[1];
    if (n < 0) throw new Error(new TextDecoder().decode(new Uint8Array(data, 0, -n).slice()));
    const bytes = new Uint8Array(data, 0, n);
    return view ? bytes : bytes.slice();
  };
}

/** `read(src, offset, len) -> Uint8Array` over blockingCalls: answered by answerRead's `reader(src, offset, len)`. */
export function blockingReads(port) {
  const call = blockingCalls(port);
  return (src, offset, len) => call({ type: 'read', src, offset, len }, len);
}

/**
 * The answering side: answers one request `msg` (as posted by blockingCalls) with `await answer(msg)` (bytes, or an
 * array of byte chunks; for a read, exactly `msg.len` of them); an error goes back as its message.
 */
export async function answer(msg, answerFn) {
  const { ctl, data } = msg;
  const flag = new Int32Array(ctl);
  try {
    // Bytes, or an array of chunks to be copied in one after another.
    const answered = await answerFn(msg);
    const parts = Array.isArray(answered) ? answered : [answered];
    const n = parts.reduce((sum, p) => sum + p.length, 0);
    if (msg.type === 'read' && n !== msg.len) throw new Error(`a read of ${msg.len} bytes returned ${n}`);
    if (n > data.byteLength) throw new Error(`an answer of ${n} bytes does not fit`);
    const view = new Uint8Array(data, 0, n);
    let at = 0;
    for (const p of parts) {
      view.set(p, at);
      at += p.length;
    }
    flag[1] = n;
  } catch (e) {
    const text = new TextEncoder().encode((e instanceof Error ? e.message : String(e)) || 'the read failed');
    const cut = text.slice(0, ERROR_MAX);
    new Uint8Array(data, 0, cut.length).set(cut);
    flag[1] = -cut.length;
  }
  Atomics.store(flag, 0, 1);
  Atomics.notify(flag, 0);
}

/** answer() for reads: `reader(src, offset, len)`. */
export const answerRead = (msg, reader) => answer(msg, ({ src, offset, len }) => reader(src, offset, len));
