// The npm package's API (browser only): inspect() and convert() run the wasm engine in the package's own worker
// (worker.js), one worker per call, since wasm memory never shrinks. Outputs come back as {name, size, stream()},
// where each stream pulls one chunk at a time from the worker, so nothing is buffered beyond the chunk in flight.

/** Normalizes what callers have into the engine's [{path, file}]: a File or Blob, a FileList, or an array. */
export function toInputs(files) {
  if (files == null) return [];
  if (typeof Blob !== 'undefined' && files instanceof Blob) files = [files];
  return Array.from(files, (f, i) => {
    if (f && typeof f.path === 'string' && f.file instanceof Blob) return { path: f.path, file: f.file };
    if (f instanceof Blob) return { path: f.webkitRelativePath || f.name || `input-${i}`, file: f };
    throw new TypeError('inputs must be Files or Blobs, or {path, file} objects');
  });
}

/** A worker with a request/reply channel; replies resolve in order of their ids. */
function engine() {
  const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  const waiting = new Map();
  let next = 0;
  let dead = null;
  const fail = (err) => {
    dead ??= err;
    for (const { reject } of waiting.values()) reject(err);
    waiting.clear();
  };
  worker.onmessage = ({ data }) => {
    const w = waiting.get(data.id);
    waiting.delete(data.id);
    if (data.type === 'error') w?.reject(new Error(data.message));
    else w?.resolve(data);
  };
  worker.onerror = (e) => fail(new Error(`ckptconv worker failed: ${e.message || 'could not start'}`));
  return {
    call(msg, transfer) {
      if (dead) return Promise.reject(dead);
      const id = next++;
      return new Promise((resolve, reject) => {
        waiting.set(id, { resolve, reject });
        worker.postMessage({ ...msg, id }, transfer ?? []);
      });
    },
    terminate(reason = new Error('the conversion was stopped')) {
      worker.terminate();
      fail(reason);
    },
  };
}

async function open(files, options) {
  const { base, ...rest } = options ?? {};
  const inputs = toInputs(files);
  if (inputs.length === 0) throw new TypeError('no input files');
  const e = engine();
  try {
    const { plan } = await e.call({ type: 'open', files: inputs, base: base ? toInputs(base) : null, options: rest });
    return { e, plan };
  } catch (err) {
    e.terminate(err);
    throw err;
  }
}

/** Plans without writing: format, notes, groups, tensors and the output files with their sizes. */
export async function inspect(files, options) {
  const { e, plan } = await open(files, options);
  e.terminate();
  return plan;
}

/**
 * A safety report of one pickle-based file (.pt, .bin, .pth), made without executing anything: every global its
 * pickles name, classed by ckptconv's allowlist, whether torch.load(weights_only=True) would accept them, whether
 * ckptconv converts it, and its tensors. The same JSON as `ckptconv scan --json`; `report.dangerous` is true when a
 * global off the allowlist is named or a part could not be read.
 */
export async function scan(file) {
  const [input] = toInputs(file);
  if (!input) throw new TypeError('no input file');
  const e = engine();
  try {
    const { report } = await e.call({ type: 'scan', file: input });
    return report;
  } finally {
    e.terminate();
  }
}

/**
 * Plans the conversion and returns its outputs. Read them in order (each stream() once); the worker ends after
 * the last byte of the last file, or at once with terminate() or when a stream is cancelled.
 */
export async function convert(files, options) {
  const { e, plan } = await open(files, options);
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
      return new ReadableStream({
        async pull(controller) {
          // The engine produces files one after another: wait until the previous file's stream has ended.
          await before;
          const r = await e.call({ type: 'pull' });
          memory = r.memoryBytes ?? memory;
          if (r.type === 'data' && r.name === o.name) {
            got += r.bytes.length;
            controller.enqueue(r.bytes);
          } else if (r.type === 'end' && r.name === o.name && got === o.size) {
            controller.close();
            closed();
            if (index === outputs.length - 1) {
              finished = true;
              e.terminate();
            }
          } else {
            throw new Error(
              `ckptconv: unexpected ${r.type} for ${r.name ?? '?'} while reading ${o.name} (${got} of ${o.size} bytes)`,
            );
          }
        },
        cancel() {
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
    terminate() {
      if (!finished) e.terminate();
    },
  };
}
