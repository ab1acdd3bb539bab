// The URL reader of `npx ckptconv` (cli.js): a worker thread that opens URLs and reads their ranges (range.js)
// while the CLI's thread sleeps on the answer (bridge.js). Messages: {type: 'open', url} answered with the JSON
// {handle, size}; {type: 'read', src: handle, offset, len} answered with the bytes; {type: 'prefetch', src,
// ranges: [[offset, len], …]} (no answer) fetches ranges that reads will ask for; {type: 'copy', src, offset,
// len, path, at} (no answer) queues a copy of a range into a file; {type: 'flush', cancel} answers once the
// queued copies are written (or, with cancel, dropped): the JSON {} or {message, errno?, offset, len} of the first
// that failed. Errors name no URL: the CLI's message names it.
import { closeSync, openSync } from 'node:fs';
import { parentPort, Worker } from 'node:worker_threads';
import { answer } from './bridge.js';
import { MAX_PIECE, UrlFile } from '../web/www/range.js';
import { nodeFetch } from './nodefetch.js';

const files = [];
/** Prefetched ranges by `src:offset:len` (a promise of the bytes), each kept until read once. */
const prefetched = new Map();
/** Ranges to prefetch next, and how many requests for them are in flight (at most PREFETCHES). */
const toPrefetch = [];
let prefetching = 0;
const PREFETCHES = 8;

/** Starts fetching `ranges` of file `src` (those inside it), PREFETCHES at a time. */
function prefetch(src, ranges) {
  const f = files[src];
  if (!f) return;
  for (const [offset, len] of ranges) if (len > 0 && offset + len <= f.size) toPrefetch.push({ src, offset, len });
  morePrefetches();
}

function morePrefetches() {
  while (prefetching < PREFETCHES && toPrefetch.length > 0) {
    const { src, offset, len } = toPrefetch.shift();
    const key = `${src}:${offset}:${len}`;
    if (prefetched.has(key)) continue;
    prefetching++;
    const bytes = files[src].read(offset, len);
    bytes.catch(() => {}); // reported to the read that takes it
    prefetched.set(key, bytes);
    bytes.finally(() => {
      prefetching--;
      morePrefetches();
    });
  }
}

/** Bytes `offset .. offset + len` of file `src`: prefetched ones once, else asked for now. */
function read(src, offset, len) {
  const key = `${src}:${offset}:${len}`;
  const ahead = prefetched.get(key);
  if (!ahead) return files[src].read(offset, len);
  prefetched.delete(key);
  return ahead;
}
const detail = (e) => {
  throw new Error(e?.detail ?? e?.message ?? String(e));
};

// Copies: verbatim ranges of a URL written into an output file, so that they never pass through the module (two
// copies fewer) and the module goes on meanwhile; it asks for them to be finished (flush) before it closes the
// file. This thread receives; writer.js writes, each read as it was received: the read's memory goes to the writer
// as it is (js/nodefetch.js's claim) and the connection reads on into a free slab, so receiving and writing run on
// two cores without a copy between them. STREAMS requests are in flight at once, so one request's latency hides
// behind another's bytes.
const STREAMS = 2;
/** One read's buffer, and one write. Measured on the bench .pt (README): 512 KiB with 8 at the writer ran faster
 * than 256 KiB x 16, 1 MiB x 4 or 128 KiB pieces; writing from multi-MiB buffers costs the kernel more. */
const SLAB = 512 << 10;
/** Slabs with the writer at most before reading pauses (a slow disk): 4 MiB. */
const WRITING = 8;
/** Requests not yet started: {f, offset, len, path, at}, each at most MAX_PIECE long. */
const queue = [];
let active = 0;
let failure = null;
/** Output files open for copies, by path (closed at flush). */
const outputs = new Map();
/** Flushes waiting for the queue to drain. */
const waiting = [];

let writer = null;
/** Slabs back from the writer; slabs given to connections to read into (WeakSet: a dead connection's go too). */
const free = [];
const lent = new WeakSet();
let writing = 0;
let writeError = null;
/** Readers held back until the writer has fewer than WRITING slabs (woken one per slab back); flushes waiting for
 * it to have none. */
const held = [];
const drained = [];
/** Wakes what waits for slabs to come back. */
function returned() {
  while (held.length > 0 && writing < WRITING) held.shift()();
  if (writing === 0) for (const f of drained.splice(0)) f();
}

/** A failed write as a file system error (its Linux errno `errno`), so that it travels as Node's own do. */
const writeFailure = (message, errno) => Object.assign(new Error(message), { errno: -errno, syscall: 'write' });

function startWriter() {
  writer = new Worker(new URL('./writer.js', import.meta.url));
  writer.unref();
  // A writer that cannot run fails the copies (its slabs are gone with it); nothing waits for them.
  const lost = (e) => {
    writeError ??= writeFailure(`the writer thread stopped (${e?.message ?? e})`, 5);
    writing = 0;
    returned();
  };
  writer.on('error', lost);
  writer.on('exit', (code) => lost(`exit code ${code}`));
  writer.on('message', ({ buffer, errno }) => {
    writing--;
    free.push(buffer);
    if (errno) writeError ??= writeFailure(`write failed (errno ${errno})`, errno);
    returned();
  });
}

const slab = () => free.pop() ?? new ArrayBuffer(SLAB);

/** The Linux errno of a failed file system call (Node's errors carry it negated), EIO without one. */
const fsErrno = (e) => (Number.isInteger(e?.errno) && e.errno < 0 ? -e.errno : 5);

/** Sends bytes `offset .. offset + len` of `buffer` (given away) to be written at `position` of `fd`. */
function send(buffer, offset, len, fd, position) {
  if (!writer) startWriter();
  writing++;
  writer.postMessage({ buffer, offset, len, fd, position }, [buffer]);
}

/** Hands a received chunk to the writer: its own memory when it may be claimed, else a copy; a promise while the
 * writer is behind. */
function put(fd, position, chunk, claim) {
  if (writeError) throw writeError;
  if (claim && lent.has(chunk.buffer)) {
    const next = slab();
    lent.add(next);
    claim(new Uint8Array(next));
    send(chunk.buffer, chunk.byteOffset, chunk.length, fd, position);
  } else {
    for (let done = 0; done < chunk.length; done += SLAB) {
      const n = Math.min(SLAB, chunk.length - done);
      const b = slab();
      new Uint8Array(b, 0, n).set(chunk.subarray(done, done + n));
      send(b, 0, n, fd, position + done);
    }
    // The connection's own buffer: from now on it reads into slabs.
    if (claim) {
      const next = slab();
      lent.add(next);
      claim(new Uint8Array(next));
    }
  }
  return writing >= WRITING ? new Promise((ok) => held.push(ok)) : undefined;
}

function queueCopy({ src, offset, len, path, at }) {
  if (failure) return;
  for (let done = 0; done < len; done += MAX_PIECE) {
    const n = Math.min(MAX_PIECE, len - done);
    queue.push({ f: files[src], offset: offset + done, len: n, path, at: at + done });
  }
  pump();
}

function pump() {
  while (!failure && active < STREAMS && queue.length > 0) {
    const job = queue.shift();
    active++;
    run(job)
      .catch((e) => {
        // A file system error (it names its system call) is the output's: its Linux errno goes back (EIO without).
        const errno = e?.syscall ? fsErrno(e) : undefined;
        failure ??= { message: e?.detail ?? e?.message ?? String(e), errno, offset: job.offset, len: job.len };
        queue.length = 0;
      })
      .finally(() => {
        active--;
        pump();
      });
  }
  if (active === 0 && queue.length === 0) for (const w of waiting.splice(0)) w();
}

async function run({ f, offset, len, path, at }) {
  let fd = outputs.get(path);
  if (fd === undefined) outputs.set(path, (fd = openSync(path, 'r+')));
  await f.stream(offset, len, (chunk, got, claim) => put(fd, at + got, chunk, claim));
}

/** Waits for the queued copies (dropping those not started, with `cancel`); then closes the outputs. */
async function flush(cancel) {
  if (cancel) queue.length = 0;
  if (active > 0 || queue.length > 0) await new Promise((ok) => waiting.push(ok));
  if (writing > 0) await new Promise((ok) => drained.push(ok));
  if (writeError) {
    failure ??= { message: writeError.message, errno: fsErrno(writeError), offset: 0, len: 0 };
    writeError = null;
  }
  for (const fd of outputs.values()) {
    try {
      closeSync(fd);
    } catch (e) {
      failure ??= { message: e.message, errno: fsErrno(e), offset: 0, len: 0 };
    }
  }
  outputs.clear();
  const answered = cancel ? {} : (failure ?? {});
  failure = null;
  return answered;
}

parentPort.on('message', (msg) => {
  // Prefetches and copies ask for no answer.
  if (msg.type === 'prefetch') return prefetch(msg.src, msg.ranges);
  if (msg.type === 'copy') return queueCopy(msg);
  let used = null;
  return answer(msg, async ({ type, url, src, offset, len }) => {
    if (type === 'open') {
      const f = await UrlFile.open(url, { fetch: nodeFetch }).catch(detail);
      files.push(f);
      return new TextEncoder().encode(JSON.stringify({ handle: files.length - 1, size: f.size }));
    }
    if (type === 'flush') return new TextEncoder().encode(JSON.stringify(await flush(msg.cancel)));
    used = await read(src, offset, len).catch(detail);
    return used;
  }).then(() => used && files[msg.src].recycle(used)); // copied into the shared buffer by now
});
