// The page's engine worker (a dedicated module worker: FileReaderSync exists only here). One worker per input and
// options, terminated afterwards, since wasm memory never shrinks: it plans ('plan'), then converts the planned job
// ('run') when the page asks, or does both at once ('convert'). Chunks go to a nested writer worker (writer.js) that
// writes them into OPFS while the engine makes the next; a bounded number in flight is the backpressure.
// Inputs are `{path, file}` with a File, or `{path, url}`, read here with synchronous Range requests (range.js).
import init, { Job, scan } from './pkg/ckptconv_web.js';
import { readPieces } from './blobread.js';
import { xhrSource } from './range.js';

// Without OPFS (old engines, some private modes) outputs up to this size are handed to the page as Blobs.
const MEMORY_LIMIT = 256 << 20;
const PROGRESS_EVERY_MS = 100;
// Chunks (up to 16 MiB each) the writer may hold: enough to overlap engine and disk, not enough to pile up.
const IN_FLIGHT = 3;
// Copy requests (up to 256 MiB of an input each; the writer splits them among its copiers) queued at the writer:
// enough that every copier has its next range waiting.
const COPIES_IN_FLIGHT = 16;

let ready;
let job = null;
let plan = null;
// The OPFS writer (and its copier pool), started as soon as a plan is shown, so that the workers' start-up is over
// by the time Convert is pressed.
let warmWriter = null;
// Resumes a run held with `hold` (tests).
let releaseHold = null;

self.onmessage = async ({ data }) => {
  if (data.type === 'release') {
    releaseHold?.();
    return;
  }
  let sink;
  try {
    ready ??= init({ module_or_path: new URL('./pkg/ckptconv_web_bg.wasm', import.meta.url) });
    await ready;
    if (data.type === 'scan') {
      postMessage({ type: 'scan', report: JSON.parse(scan(sources([data.file])[0])) });
      return;
    }
    if (data.type === 'plan' || data.type === 'convert') {
      // copies: bytes that pass unchanged come as ranges of the inputs, which the writer copies itself.
      job = new Job(sources(data.files), sources(data.base) ?? null, { ...data.options, copies: true });
      plan = JSON.parse(job.planJson());
      postMessage({ type: 'plan', plan, memoryBytes: Job.memoryBytes() });
      if (data.type === 'plan' && usesOpfs(data.store)) warmWriter ??= startWriter(data.copiers);
    }
    if (data.type !== 'run' && data.type !== 'convert') return;
    const total = plan.outputs.reduce((n, o) => n + o.size, 0);
    sink = usesOpfs(data.store) ? await opfsSink(data.jobId, data.copiers) : memorySink(total);
    await run(sink, total, data.hold);
  } catch (e) {
    await sink?.abort().catch(() => {});
    postMessage({ type: 'error', message: e instanceof Error ? e.message : String(e) });
  }
};

/**
 * The engine's `{path, file}` for each input: Files as they are, `{path, url}` as a synchronous reader of the URL
 * (opening one asks for its first byte: its size, and whether the server honours Range).
 */
function sources(inputs) {
  return inputs?.map((f) => (f.url === undefined ? f : { path: f.path, file: xhrSource(f.url) }));
}

/** Pulls every piece into `sink`; with `hold` (tests), stops after that many pieces, once some are on disk, until
 * released or terminated. */
async function run(sink, total, hold) {
  const t0 = performance.now();
  let shown = 0;
  // Where the time goes, for the bench: inside the engine (reading, converting) or waiting for the writer.
  let engineMs = 0;
  let waitMs = 0;
  // Bytes that went out as copies of input ranges (never through wasm memory; a URL's are read here, a File's by
  // the writer's copiers).
  let copiedBytes = 0;
  // A copy of a URL's range in progress: a reader cannot be posted to the writer (functions do not clone), so its
  // bytes are read here, a piece at a time, and handed on as data, each piece waiting for room like the engine's.
  let reading = null;
  for (let pieces = 0; ; ) {
    if (pieces === hold && !reading) {
      while (sink.done() === 0) await new Promise((ok) => setTimeout(ok, 10));
      postMessage({ type: 'progress', done: sink.done(), total, ms: performance.now() - t0 });
      await new Promise((ok) => (releaseHold = ok)); // or until the page terminates this worker (Cancel)
      releaseHold = null;
    }
    const t = performance.now();
    await sink.room();
    const t1 = performance.now();
    let piece;
    if (reading) {
      const read = reading.next();
      if (read.done) {
        reading = null;
        continue;
      }
      piece = { kind: 'data', bytes: read.value[0] };
    } else {
      piece = job.next();
      pieces++;
    }
    waitMs += t1 - t;
    engineMs += performance.now() - t1;
    if (piece === null) break;
    if (piece.kind === 'begin') {
      sink.begin(piece.name, piece.size);
    } else if (piece.kind === 'end') {
      sink.end();
    } else if (piece.kind === 'copy') {
      if (piece.file instanceof Blob) sink.copy(piece.file, piece.name, piece.offset, piece.len);
      else reading = readPieces(piece.file, piece.name, piece.offset, piece.len);
      copiedBytes += piece.len;
    } else {
      sink.write(piece.bytes);
    }
    if (t1 - shown >= PROGRESS_EVERY_MS) {
      shown = t1;
      postMessage({ type: 'progress', done: sink.done(), total, ms: t1 - t0 });
    }
  }
  await sink.finish();
  const ms = performance.now() - t0;
  const memoryBytes = Job.memoryBytes();
  postMessage({ type: 'done', done: sink.done(), total, ms, engineMs, waitMs, copiedBytes, memoryBytes });
}

const usesOpfs = (store) => store !== 'memory' && typeof FileSystemSyncAccessHandle !== 'undefined';

/** A nested OPFS writer with its copier pool starting (`copiers` as in opfsSink). */
function startWriter(copiers) {
  const writer = new Worker(new URL('./writer.js', import.meta.url), { type: 'module' });
  writer.postMessage({ type: 'start', copiers });
  return writer;
}

/**
 * Feeds the nested OPFS writer (the one started at plan time, if any); room() waits while IN_FLIGHT chunks or
 * COPIES_IN_FLIGHT copy requests are not yet on disk. `copiers` sizes the writer's copier pool (0: the writer copies
 * ranges itself; undefined: its default).
 */
async function opfsSink(jobId, copiers) {
  const writer = warmWriter ?? startWriter(copiers);
  warmWriter = null;
  let inFlight = 0;
  let copies = 0;
  let written = 0;
  let failure = null;
  let wake = () => {};
  const settled = new Promise((ok) => {
    writer.onmessage = ({ data }) => {
      if (data.type === 'written') {
        inFlight--;
        written += data.bytes;
      } else if (data.type === 'progress') {
        written += data.bytes;
      } else if (data.type === 'copied') {
        copies--;
      } else if (data.type === 'error') {
        failure = new Error(data.message);
      } else if (data.type === 'finished' || data.type === 'aborted') {
        ok(data.type);
      }
      wake();
    };
  });
  writer.onerror = (e) => {
    failure = new Error(`the OPFS writer failed: ${e.message || 'could not start'}`);
    wake();
  };
  const until = async (cond) => {
    while (!cond() && !failure) await new Promise((ok) => (wake = ok));
    if (failure) throw failure;
  };
  writer.postMessage({ type: 'open', jobId });
  return {
    room: () => until(() => inFlight < IN_FLIGHT && copies < COPIES_IN_FLIGHT),
    begin: (name, size) => writer.postMessage({ type: 'begin', name, size }),
    write(bytes) {
      inFlight++;
      // Each chunk is a fresh copy out of wasm memory: transfer it, don't clone it.
      writer.postMessage({ type: 'data', bytes }, [bytes.buffer]);
    },
    copy(file, name, offset, len) {
      copies++;
      writer.postMessage({ type: 'copy', file, name, offset, len });
    },
    end: () => writer.postMessage({ type: 'end' }),
    done: () => written,
    async finish() {
      writer.postMessage({ type: 'finish' });
      await until(() => inFlight === 0 && copies === 0);
      if ((await settled) !== 'finished') throw failure ?? new Error('the OPFS writer stopped');
      if (failure) throw failure;
    },
    async abort() {
      failure ??= new Error('aborted');
      writer.postMessage({ type: 'abort', jobId });
      await Promise.race([settled, new Promise((ok) => setTimeout(ok, 5000))]);
      writer.terminate();
    },
  };
}

/** Hands each output to the page in pieces (transferred, not copied); only for small outputs. */
function memorySink(total) {
  if (total > MEMORY_LIMIT) {
    throw new Error(
      `this browser cannot write files from a worker (no OPFS), and ${total} bytes is too much to keep in memory`,
    );
  }
  let sent = 0;
  const sink = {
    room: async () => {},
    begin: (name, size) => postMessage({ type: 'file', name, size }),
    write(bytes) {
      sent += bytes.length;
      postMessage({ type: 'chunk', bytes }, [bytes.buffer]);
    },
    copy(file, name, offset, len) {
      // Without OPFS, copied ranges are read here and handed on in pieces.
      for (const [bytes] of readPieces(file, name, offset, len)) sink.write(bytes);
    },
    end() {},
    done: () => sent,
    async finish() {},
    async abort() {},
  };
  return sink;
}
