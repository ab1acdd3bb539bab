// The npm package's worker: holds one engine Job and answers the main thread's requests one at a time.
// It must be a dedicated module worker: the engine reads inputs with FileReaderSync, which exists only there.
// Requests carry an id that the reply echoes: {id, type: 'open' | 'pull' | 'memory' | 'scan', ...}.
import init, { Job, scan } from '../web/pkg/ckptconv_web.js';
import { readPieces } from '../web/www/blobread.js';

const ready = init({ module_or_path: new URL('../web/pkg/ckptconv_web_bg.wasm', import.meta.url) });
let job = null;
let current = null; // the output being produced
// Bytes that pass unchanged are read straight from the input Blob (not through wasm memory), piece by piece:
// the pieces of the range still to hand on.
let copying = null;

self.onmessage = async ({ data: { id, type, ...args } }) => {
  try {
    await ready;
    if (type === 'open') {
      job = new Job(args.files, args.base ?? null, { ...args.options, copies: true });
      postMessage({ id, type: 'plan', plan: JSON.parse(job.planJson()) });
    } else if (type === 'pull') {
      pull(id);
    } else if (type === 'scan') {
      postMessage({ id, type: 'report', report: JSON.parse(scan(args.file)) });
    } else if (type === 'memory') {
      postMessage({ id, type: 'memory', bytes: Job.memoryBytes() });
    }
  } catch (e) {
    postMessage({ id, type: 'error', message: e instanceof Error ? e.message : String(e) });
  }
};

/** Answers with the next chunk of the current output, its end, or 'done'; `begin` pieces are folded in. */
function pull(id) {
  for (;;) {
    const next = copying?.next();
    if (next && !next.done) {
      const [bytes] = next.value;
      return postMessage({ id, type: 'data', name: current, bytes }, [bytes.buffer]);
    }
    copying = null;
    const piece = job.next();
    if (piece === null) return postMessage({ id, type: 'done', memoryBytes: Job.memoryBytes() });
    if (piece.kind === 'begin') {
      current = piece.name;
    } else if (piece.kind === 'copy') {
      copying = readPieces(piece.file, piece.name, piece.offset, piece.len);
    } else if (piece.kind === 'end') {
      return postMessage({ id, type: 'end', name: current, memoryBytes: Job.memoryBytes() });
    } else {
      // Each chunk is a fresh copy out of wasm memory, so its buffer can be transferred rather than cloned.
      return postMessage({ id, type: 'data', name: current, bytes: piece.bytes }, [piece.bytes.buffer]);
    }
  }
}
