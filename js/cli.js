#!/usr/bin/env node
// `npx ckptconv …`: the native CLI's contract in Node, without a Rust toolchain. It runs the CLI itself, compiled
// for WASI (web/pkg/ckptconv_cli.wasm, built with feature host-url), under Node's WASI with the whole file system
// visible as the native binary sees it, so arguments, outputs, `ckptconv: error[KIND]: …` lines and exit codes are
// the native ones. An INPUT that is an http(s) URL is read through the module's `ckptconv_host` imports:
// this thread sleeps on them while fetcher.js reads the URL with Range requests (range.js).
import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { blockingCalls } from './bridge.js';

// Node marks WASI experimental and says so on stderr: keep stderr the native CLI's (other warnings still show).
process.removeAllListeners('warning');
process.on('warning', (w) => {
  if (w.name !== 'ExperimentalWarning') process.stderr.write(`${w.name}: ${w.message}\n`);
});
const { WASI } = await import('node:wasi');
// Baseline (Liftoff) code only. With V8's default tier-up, optimizing compilation runs on background threads, and a
// process that exits while it does (a usage error, a quick refusal) crashed with SIGSEGV in about 1 of 25 runs on a
// loaded machine; Liftoff alone compiles before instantiation and was as fast on the conversions measured (a 400 MB
// .pt to fp16: 1.23 s against 1.41 s with tier-up, and 72 against 102 MiB peak RSS). No incremental marking: the
// memory-pressure GC that growing a big wasm memory triggers then finished an incremental mark and crashed Node 20
// (V8 "unreachable code" in ProcessEphemerons) in 2 of 6 runs of tests/e2e/test_hostile.py's zstd budget case; 0 of
// 10 without it. The JS heap here is small: full marking costs nothing.
(await import('node:v8')).setFlagsFromString('--no-wasm-tier-up --no-wasm-dynamic-tiering --no-incremental-marking');

const module = await WebAssembly.compile(readFileSync(new URL('../web/pkg/ckptconv_cli.wasm', import.meta.url)));
const wasi = new WASI({
  version: 'preview1',
  args: ['ckptconv', ...process.argv.slice(2)],
  // The native binary's view: absolute paths, and relative ones from the working folder (set by the module).
  env: { ...process.env, CKPTCONV_HOST_CWD: process.cwd() },
  preopens: { '/': '/' },
  // proc_exit ends the process there and then: returning through the wasm stack instead (returnOnExit) crashed
  // Node 20 on exit after a run that left a big heap (tests/hostile/memo_many.pt: SIGSEGV after the error line).
  returnOnExit: false,
});

let fetcher = null;
let call = null;
let lastError = '';
let instance;
const enc = new TextEncoder();
const memory = () => new Uint8Array(instance.exports.memory.buffer);
/** Runs a call on the fetcher (started on first use); an error's text is kept for last_error. */
function blocking(msg, max, view) {
  if (!fetcher) {
    fetcher = new Worker(new URL('./fetcher.js', import.meta.url));
    fetcher.unref();
    call = blockingCalls(fetcher);
  }
  return call(msg, max, view);
}
const failed = (e) => {
  lastError = e instanceof Error ? e.message : String(e);
  return -Math.max(1, enc.encode(lastError).length);
};

const host = {
  url_open(ptr, len, sizePtr) {
    try {
      const url = new TextDecoder().decode(memory().slice(ptr, ptr + len));
      const { handle, size } = JSON.parse(new TextDecoder().decode(blocking({ type: 'open', url }, 4096)));
      new DataView(instance.exports.memory.buffer).setBigUint64(sizePtr, BigInt(size), true);
      return handle;
    } catch (e) {
      return failed(e);
    }
  },
  url_read(handle, offset, ptr, len) {
    try {
      // Straight from the shared buffer into the module's memory (one copy).
      const bytes = blocking({ type: 'read', src: handle, offset: Number(offset), len }, len, true);
      memory().set(bytes, ptr);
      return 0;
    } catch (e) {
      return failed(e);
    }
  },
  url_prefetch(handle, ptr, count) {
    // No answer: the fetcher asks for the ranges (a few at a time) and keeps them for the reads that follow.
    const words = new BigUint64Array(instance.exports.memory.buffer, ptr, 2 * count);
    const ranges = Array.from({ length: count }, (_, i) => [Number(words[2 * i]), Number(words[2 * i + 1])]);
    fetcher?.postMessage({ type: 'prefetch', src: handle, ranges });
  },
  url_copy(handle, offset, len, pathPtr, pathLen, at) {
    // No answer: the fetcher writes the range while the module goes on; url_flush waits for it.
    const path = new TextDecoder().decode(memory().slice(pathPtr, pathPtr + pathLen));
    fetcher?.postMessage({ type: 'copy', src: handle, offset: Number(offset), len: Number(len), path, at: Number(at) });
  },
  url_flush(cancel, offsetPtr) {
    try {
      const done = JSON.parse(new TextDecoder().decode(blocking({ type: 'flush', cancel: cancel !== 0 }, 4096)));
      if (done.message === undefined) return 0;
      lastError = done.message;
      new DataView(instance.exports.memory.buffer).setBigUint64(offsetPtr, BigInt(done.offset), true);
      // A failed write comes back as its (positive) Linux errno, a failed read as minus its message's length.
      return done.errno ?? -Math.max(1, enc.encode(lastError).length);
    } catch (e) {
      return failed(e);
    }
  },
  last_error(ptr, cap) {
    const bytes = enc.encode(lastError).slice(0, cap);
    memory().set(bytes, ptr);
    return bytes.length;
  },
};

instance = await WebAssembly.instantiate(module, { wasi_snapshot_preview1: wasi.wasiImport, ckptconv_host: host });
// Reached only when main returns 0 (a non-zero status goes through proc_exit).
wasi.start(instance);
process.exit(0);
