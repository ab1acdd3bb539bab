// The npm package's API, in browsers and in Node ≥ 20: inspect(), scan() and convert() run the wasm engine in the
// package's own worker (worker.js: a Web Worker, or a worker_threads Worker in Node), one worker per call, since
// wasm memory never shrinks. Outputs come back as {name, size, stream()}, where each stream pulls one chunk at a
// time from the worker, so nothing is buffered beyond the chunk in flight.
//
// Inputs are Files/Blobs, `{path, file}`, `{path, url}` (read with HTTP Range requests, see range.js), Blob-likes
// (`size` and `slice(a, b).arrayBuffer()`, e.g. huggingface.js's WebBlob) and, in Node, paths of files or folders.
// In a browser the worker reads Blobs (FileReaderSync) and URLs (synchronous XHR) itself; everything else is read
// here and handed to the worker's synchronous reads through shared memory (bridge.js).
import { answerRead } from './bridge.js';
import { MAX_PIECE, URL_BLOCK, UrlFile } from '../web/www/range.js';

const IN_NODE = typeof process !== 'undefined' && !!process.versions?.node && typeof window === 'undefined';
const isBlob = (f) => typeof Blob !== 'undefined' && f instanceof Blob;
const isBlobLike = (f) => f != null && typeof f.size === 'number' && typeof f.slice === 'function';
const isUrlText = (s) => typeof s === 'string' && /^https?:\/\//i.test(s);

/**
 * Normalizes what callers have into `[{path, file}]`, `[{path, url}]`, `[{path, blobLike}]` or (Node)
 * `[{path, local}]`: a File or Blob, a FileList, a URL, a path, or an array of these or of `{path, file|url}`.
 */
export function toInputs(files) {
  if (files == null) return [];
  const one = isBlob(files) || typeof files === 'string' || files instanceof URL || isBlobLike(files);
  if (one || typeof files.path === 'string') files = [files];
  return Array.from(files, (f, i) => {
    if (f && typeof f.path === 'string' && isBlob(f.file)) return { path: f.path, file: f.file };
    if (f && typeof f.path === 'string' && (isUrlText(f.url) || f.url instanceof URL))
      return { path: f.path, url: String(f.url) };
    if (f && typeof f.path === 'string' && isBlobLike(f.file)) return { path: f.path, blobLike: f.file };
    if (isBlob(f)) return { path: f.webkitRelativePath || f.name || `input-${i}`, file: f };
    if (isUrlText(f) || (f instanceof URL && /^https?:$/.test(f.protocol))) {
      const u = new URL(String(f));
      return { path: decodeURIComponent(u.pathname.split('/').pop() || `input-${i}`), url: u.href };
    }
    if (isBlobLike(f)) return { path: f.name || `input-${i}`, blobLike: f };
    if (IN_NODE && (typeof f === 'string' || f instanceof URL)) return { local: f };
    throw new TypeError('inputs must be Files or Blobs, URLs, Blob-likes, {path, file} or {path, url} objects');
  });
}

/** Node: a path of a file or a folder, as inputs named like the browser's folder input (`top/rel/path`). */
async function localInputs(target) {
  const { stat, readdir } = await import('node:fs/promises');
  const { basename, join, resolve } = await import('node:path');
  const { fileURLToPath } = await import('node:url');
  const abs = resolve(target instanceof URL ? fileURLToPath(target) : target);
  const info = await stat(abs);
  if (info.isFile()) return [{ path: basename(abs), local: abs, size: info.size }];
  const out = [];
  const walk = async (dir, rel, depth) => {
    if (depth > 16) throw new Error(`${abs}: folders nested deeper than 16 levels`);
    for (const d of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const p = join(dir, d.name);
      if (d.isDirectory()) await walk(p, `${rel}/${d.name}`, depth + 1);
      else if (d.isFile()) out.push({ path: `${rel}/${d.name}`, local: p, size: (await stat(p)).size });
    }
  };
  await walk(abs, basename(abs), 0);
  return out;
}

/**
 * Opens every input for the worker: returns what the worker gets (Blobs as they are; `{path, remote: i, size,
 * block}` for what this thread reads; `{path, xhr: url}` for URLs the browser worker reads itself; `{path, local,
 * size}` for Node files) and pushes onto `sources` the reader of each `remote: i`: `{read(offset, len), range?
 * (offset, len) (pieces, the next fetched while one is used), url? (its UrlFile)}`.
 */
async function describe(inputs, sources, signal) {
  const described = [];
  for (const input of inputs) {
    if (input.local !== undefined && input.size === undefined) {
      described.push(...(await describe(await localInputs(input.local), sources, signal)));
    } else if (input.local !== undefined) {
      described.push(input);
    } else if (input.file && !IN_NODE) {
      described.push(input);
    } else if (input.url && !IN_NODE) {
      described.push({ path: input.path, xhr: input.url });
    } else if (input.url || input.blobLike || (IN_NODE && input.file)) {
      if (!IN_NODE && typeof SharedArrayBuffer === 'undefined')
        throw new Error(
          `${input.path}: a Blob-like input is read through shared memory, which a browser gives only to ` +
            'cross-origin-isolated pages; pass {path, url} or a Blob instead',
        );
      let source, size;
      if (input.url) {
        // In Node, js/nodefetch.js: range answers read without an allocation per chunk.
        const fetch = IN_NODE ? (await import('./nodefetch.js')).nodeFetch : undefined;
        const url = await UrlFile.open(input.url, { signal, fetch });
        source = { url, read: (offset, len) => url.read(offset, len), range: (offset, len) => url.range(offset, len) };
        size = url.size;
      } else {
        const b = input.blobLike ?? input.file;
        source = { read: async (offset, len) => new Uint8Array(await b.slice(offset, offset + len).arrayBuffer()) };
        size = b.size;
      }
      sources.push(source);
      described.push({ path: input.path, remote: sources.length - 1, size, block: input.url ? URL_BLOCK : 1 << 16 });
    } else {
      throw new TypeError(`unsupported input ${input.path ?? ''}`);
    }
  }
  return described;
}

/** A browser Web Worker or a Node worker_threads Worker behind one interface. */
async function spawn() {
  const url = new URL('./worker.js', import.meta.url);
  if (!IN_NODE) {
    const w = new Worker(url, { type: 'module' });
    return {
      on: (msg, err) => {
        w.onmessage = ({ data }) => msg(data);
        w.onerror = (e) => err(new Error(`ckptconv worker failed: ${e.message || 'could not start'}`));
      },
      post: (m, t) => w.postMessage(m, t ?? []),
      terminate: () => w.terminate(),
    };
  }
  const threads = await import('node:worker_threads');
  const w = new threads.Worker(url);
  // The caller's process may exit while a stopped worker winds down.
  w.unref();
  return {
    on: (msg, err) => {
      w.on('message', msg);
      w.on('error', (e) => err(new Error(`ckptconv worker failed: ${e.message}`)));
    },
    post: (m, t) => w.postMessage(m, t ?? []),
    terminate: () => w.terminate(),
  };
}

/** A worker with a request/reply channel; replies resolve by id; the worker's reads are answered from `sources`. */
async function engine(sources) {
  const worker = await spawn();
  const waiting = new Map();
  let next = 0;
  let dead = null;
  const fail = (err) => {
    dead ??= err;
    for (const { reject } of waiting.values()) reject(err);
    waiting.clear();
  };
  worker.on((data) => {
    if (data.type === 'read') return answerRead(data, (src, offset, len) => sources[src].read(offset, len));
    const w = waiting.get(data.id);
    waiting.delete(data.id);
    if (data.type === 'error') w?.reject(new Error(data.message));
    else w?.resolve(data);
  }, fail);
  return {
    call(msg, transfer) {
      if (dead) return Promise.reject(dead);
      const id = next++;
      return new Promise((resolve, reject) => {
        waiting.set(id, { resolve, reject });
        worker.post({ ...msg, id }, transfer);
      });
    },
    terminate(reason = new Error('the conversion was stopped')) {
      worker.terminate();
      fail(reason);
    },
  };
}

/** Starts a worker for `files` (and options.base): resolves to {e, plan, sources}. */
async function open(files, options, type = 'open') {
  const { base, signal, ...rest } = options ?? {};
  signal?.throwIfAborted();
  const sources = [];
  const inputs = await describe(toInputs(files), sources, signal);
  if (inputs.length === 0) throw new TypeError('no input files');
  const baseInputs = base ? await describe(toInputs(base), sources, signal) : null;
  const e = await engine(sources);
  const stop = () => e.terminate(signal.reason instanceof Error ? signal.reason : new Error('the conversion was aborted'));
  signal?.addEventListener('abort', stop, { once: true });
  try {
    const reply = await e.call({ type, files: inputs, base: baseInputs, options: rest });
    return { e, reply, sources, done: () => signal?.removeEventListener('abort', stop) };
  } catch (err) {
    signal?.removeEventListener('abort', stop);
    e.terminate(err);
    throw err;
  }
}

/** Plans without writing: format, notes, groups, tensors and the output files with their sizes. */
export async function inspect(files, options) {
  const { e, reply, done } = await open(files, options);
  done();
  e.terminate();
  return reply.plan;
}

/**
 * A safety report of one pickle-based file (.pt, .bin, .pth), made without executing anything: every global its
 * pickles name, classed by ckptconv's allowlist, whether torch.load(weights_only=True) would accept them, whether
 * ckptconv converts it, and its tensors. The same JSON as `ckptconv scan --json`; `report.dangerous` is true when a
 * global off the allowlist is named or a part could not be read. Only the bytes the scan needs are read.
 */
export async function scan(file, options) {
  const { e, reply, done } = await open(file, { signal: options?.signal }, 'scan');
  done();
  e.terminate();
  return reply.report;
}

/** Reads bytes `offset .. offset + len` of a copy piece's input, in pieces (an async iterator of Uint8Array). */
async function* copyPieces(ref, sources, offset, len) {
  if (ref.local !== undefined) {
    const { open: openFile } = await import('node:fs/promises');
    const fh = await openFile(ref.local, 'r');
    try {
      for (let at = 0; at < len; ) {
        const n = Math.min(MAX_PIECE, len - at);
        const buf = new Uint8Array(n);
        let got = 0;
        while (got < n) {
          const { bytesRead } = await fh.read(buf, got, n - got, offset + at + got);
          if (bytesRead === 0) throw new Error(`${ref.local}: the file was cut while it was being read`);
          got += bytesRead;
        }
        yield buf;
        at += n;
      }
    } finally {
      await fh.close();
    }
  } else if (sources[ref.remote].range) {
    yield* sources[ref.remote].range(offset, len);
  } else {
    const { read } = sources[ref.remote];
    for (let at = 0; at < len; at += MAX_PIECE) yield await read(offset + at, Math.min(MAX_PIECE, len - at));
  }
}

/**
 * Plans the conversion and returns its outputs. Read them in order (each stream() once); the worker ends after
 * the last byte of the last file, or at once with terminate(), when a stream is cancelled or options.signal aborts.
 */
export async function convert(files, options) {
  const { e, reply, sources, done: unhook } = await open(files, options);
  const { plan } = reply;
  let opened = 0;
  let previousDone = Promise.resolve();
  let finished = false;
  let memory = 0;
  const outputs = plan.outputs.map((o, index) => ({
    name: o.name,
    size: o.size,
    stream() {
      if (index !== opened) {
        throw new Error(
          `read the outputs in order: ${index < opened ? 'already read' : `open ${plan.outputs[opened].name} first`}`,
        );
      }
      opened++;
      let closed;
      const done = new Promise((ok) => (closed = ok));
      const before = previousDone;
      previousDone = done;
      let got = 0;
      let copying = null;
      return new ReadableStream({
        async pull(controller) {
          // The engine produces files one after another: wait until the previous file's stream has ended.
          await before;
          let r;
          for (;;) {
            if (copying) {
              const next = await copying.next();
              if (!next.done) {
                got += next.value.length;
                return controller.enqueue(next.value);
              }
              copying = null;
            }
            r = await e.call({ type: 'pull' });
            if (r.type !== 'copy' || r.name !== o.name) break;
            // Bytes that pass unchanged: read here, straight from the input, not through the worker.
            copying = copyPieces(r.ref, sources, r.offset, r.len);
          }
          memory = r.memoryBytes ?? memory;
          if (r.type === 'data' && r.name === o.name) {
            got += r.bytes.length;
            controller.enqueue(r.bytes);
          } else if (r.type === 'end' && r.name === o.name && got === o.size) {
            controller.close();
            closed();
            if (index === outputs.length - 1) {
              finished = true;
              unhook();
              e.terminate();
            }
          } else {
            throw new Error(
              `ckptconv: unexpected ${r.type} for ${r.name ?? '?'} while reading ${o.name} (${got} of ${o.size} bytes)`,
            );
          }
        },
        cancel() {
          unhook();
          e.terminate(new Error(`the conversion was stopped: ${o.name} was cancelled`));
        },
      });
    },
  }));
  return {
    plan,
    files: outputs,
    /** Bytes of wasm memory the engine has used so far (its peak: it never shrinks), also after it ended. */
    async memoryBytes() {
      return finished ? memory : (await e.call({ type: 'memory' })).bytes;
    },
    /** Bytes fetched from URLs so far (each Range answer's body). */
    fetchedBytes() {
      return sources.reduce((n, s) => n + (s.url?.fetched ?? 0), 0);
    },
    terminate() {
      if (!finished) {
        unhook();
        e.terminate();
      }
    },
  };
}

/**
 * Node: converts and writes every output into `dir` (created if needed), atomically: each file is written under a
 * hidden `.NAME.partial` name and all are renamed only after the last byte of the last one, so a failure or an
 * abort leaves nothing that looks finished (the partial files are deleted). Existing files of the same names are
 * replaced only with `{overwrite: true}`. Resolves to the conversion's plan.
 */
export async function convertToFolder(files, dir, options = {}) {
  const { overwrite = false, ...rest } = options;
  const fs = await import('node:fs/promises');
  const { basename, dirname, join, resolve, sep } = await import('node:path');
  const root = resolve(dir);
  const c = await convert(files, rest);
  const written = [];
  const target = (name) => {
    const p = resolve(root, name);
    if (!p.startsWith(root + sep)) throw new Error(`${name}: an output name outside the folder`);
    return p;
  };
  try {
    for (const f of c.files) {
      const final = target(f.name);
      if (!overwrite && (await fs.stat(final).catch(() => null)))
        throw new Error(`${final}: already exists (pass {overwrite: true} to replace it)`);
    }
    for (const f of c.files) {
      const final = target(f.name);
      const partial = join(dirname(final), `.${basename(final)}.partial`);
      await fs.mkdir(dirname(final), { recursive: true });
      written.push([partial, final]);
      const fh = await fs.open(partial, 'w');
      try {
        for await (const chunk of f.stream()) await fh.write(chunk);
      } finally {
        await fh.close();
      }
    }
    for (const [partial, final] of written) await fs.rename(partial, final);
    return c.plan;
  } catch (err) {
    c.terminate();
    await Promise.all(written.map(([partial]) => fs.rm(partial, { force: true })));
    throw err;
  }
}
