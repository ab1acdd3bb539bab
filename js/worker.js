// The npm package's worker (a dedicated module Web Worker, or a worker_threads Worker in Node): holds one engine Job
// and answers the calling thread's requests one at a time. The engine reads its inputs synchronously: Blobs with
// FileReaderSync (browser), URLs with synchronous XHR (browser), Node files with fs.readSync, and everything else
// through the calling thread (bridge.js). Requests carry an id that the reply echoes:
// {id, type: 'open' | 'pull' | 'memory' | 'scan', ...}.
import init, { Job, scan } from '../web/pkg/ckptconv_web.js';
import { readPieces } from '../web/www/blobread.js';
import { blockingReads } from './bridge.js';
import { xhrSource } from '../web/www/range.js';

const node = typeof self === 'undefined' || typeof self.postMessage !== 'function';
const port = node ? (await import('node:worker_threads')).parentPort : self;
const fs = node ? await import('node:fs') : null;
const post = (m, transfer) => port.postMessage(m, transfer ?? []);
const wasm = new URL('../web/pkg/ckptconv_web_bg.wasm', import.meta.url);
// Node's fetch reads no file: URLs; give the engine's bytes instead.
const ready = init({ module_or_path: node ? fs.readFileSync(wasm) : wasm });
const readRemote = blockingReads(port);

let job = null;
let current = null; // the output being produced
// Bytes that pass unchanged are read straight from the input (not through wasm memory), piece by piece:
// the pieces of the range still to hand on.
let copying = null;

/** A Node file as a synchronous reader (fs.readSync into the caller's piece). */
function localSource({ local, size }) {
  const fd = fs.openSync(local, 'r');
  return {
    size,
    ref: { local },
    read(offset, len) {
      const out = new Uint8Array(len);
      for (let got = 0; got < len; ) {
        const n = fs.readSync(fd, out, got, len - got, offset + got);
        if (n === 0) throw new Error('the file was cut while it was being read');
        got += n;
      }
      return out;
    },
  };
}

/** The engine's `{path, file}` for each described input (see index.js's describe()). */
function sources(described) {
  return described?.map((d) => {
    if (d.file) return d;
    if (d.xhr) return { path: d.path, file: xhrSource(d.xhr) };
    if (d.local !== undefined) return { path: d.path, file: localSource(d) };
    const ref = { remote: d.remote };
    return {
      path: d.path,
      file: { size: d.size, block: d.block, ref, read: (offset, len) => readRemote(d.remote, offset, len) },
    };
  });
}

async function handle({ id, type, ...args }) {
  try {
    await ready;
    if (type === 'open') {
      job = new Job(sources(args.files), sources(args.base) ?? null, { ...args.options, copies: true });
      post({ id, type: 'plan', plan: JSON.parse(job.planJson()) });
    } else if (type === 'pull') {
      pull(id);
    } else if (type === 'scan') {
      const [file] = sources(args.files);
      post({ id, type: 'report', report: JSON.parse(scan(file)) });
    } else if (type === 'memory') {
      post({ id, type: 'memory', bytes: Job.memoryBytes() });
    }
  } catch (e) {
    post({ id, type: 'error', message: e instanceof Error ? e.message : String(e) });
  }
}

if (node) port.on('message', handle);
else self.onmessage = ({ data }) => handle(data);

/** Answers with the next chunk of the current output, its end, or 'done'; `begin` pieces are folded in. */
function pull(id) {
  for (;;) {
    const next = copying?.next();
    if (next && !next.done) {
      const [bytes] = next.value;
      return post({ id, type: 'data', name: current, bytes }, [bytes.buffer]);
    }
    copying = null;
    const piece = job.next();
    if (piece === null) return post({ id, type: 'done', memoryBytes: Job.memoryBytes() });
    if (piece.kind === 'begin') {
      current = piece.name;
    } else if (piece.kind === 'copy') {
      // Node files and what the calling thread reads: it copies them itself, without a trip through here.
      const { ref } = piece.file;
      if (ref) return post({ id, type: 'copy', name: current, ref, offset: piece.offset, len: piece.len });
      copying = readPieces(piece.file, piece.name, piece.offset, piece.len);
    } else if (piece.kind === 'end') {
      return post({ id, type: 'end', name: current, memoryBytes: Job.memoryBytes() });
    } else {
      // Each chunk is a fresh copy out of wasm memory, so its buffer can be transferred rather than cloned.
      return post({ id, type: 'data', name: current, bytes: piece.bytes }, [piece.bytes.buffer]);
    }
  }
}
