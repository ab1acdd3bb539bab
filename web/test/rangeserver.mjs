// A range-read HTTP server for the tests of reading checkpoints over HTTP (Node, and Chromium via Playwright): serves
// the files under one folder on 127.0.0.1 with byte ranges, CORS and no caching, and misbehaves on demand (dropped
// connections, ignored ranges, 503s, a file that grows) so readers' retries and fallbacks can be tested. It owns its
// counters (body bytes, GETs, drops), its request log and its fault memory; the served files are only ever read.
// `node web/test/rangeserver.mjs ROOT [port] [mode]` prints the base URL and serves ROOT until killed. Run by
// `node --test web/test/` without arguments, it does nothing: its tests are in rangeserver.test.mjs.
import { createReadStream, readdirSync, statSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

/** What `mode` may be set to; see serveFiles. */
export const MODES = ['normal', 'drop', 'ignore-range', 'flaky-5xx', 'grow'];

/** The first path component of the manifest endpoint: GET /__manifest__/<relFolder> answers manifest(relFolder). */
export const MANIFEST_PREFIX = '__manifest__';

const CORS = {
  'access-control-allow-origin': '*',
  'access-control-expose-headers': 'Content-Range, Content-Length, Accept-Ranges, ETag',
};
const PREFLIGHT = {
  'access-control-allow-methods': 'GET, HEAD, OPTIONS',
  'access-control-allow-headers': 'Range',
  'access-control-max-age': '600',
};
// Read-ahead per chunk: big enough for GB-sized files, small enough that backpressure bounds memory.
const CHUNK = 1 << 20;
const UNSATISFIABLE = 'unsatisfiable';

/**
 * Serves the files under `root` on 127.0.0.1 (a directory, or a path outside `root`, is never served).
 *
 * Responses: GET/HEAD with `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` get 206 with Content-Range
 * `bytes a-b/total` (b clamped to total-1, a suffix longer than the file means all of it); without Range, 200 and
 * the whole file. 416 with Content-Range `bytes *\/total` for: a start at or past the end, `bytes=-0`, b < a, any
 * malformed bytes range, any range on an empty file, and every multi-range request (`bytes=0-1,5-6`: no multipart
 * bodies here). A Range in another unit (`items=0-1`) is ignored (200). If-Range and other conditionals are
 * ignored. Every response carries `Access-Control-Allow-Origin: *`, Access-Control-Expose-Headers (Content-Range,
 * Content-Length, Accept-Ranges, ETag) and `Cache-Control: no-store`; file responses also `Accept-Ranges: bytes`
 * (in every mode), an ETag made of the reported size and the mtime, and Content-Type application/octet-stream
 * (application/json for .json). OPTIONS (any path) answers 204 with the preflight headers; other methods 405.
 * Paths are percent-decoded per segment; a `..` segment (raw or encoded), an encoded `/` or NUL, or a path that
 * resolves outside `root` gets 403, a bad escape 400. Symlinks inside `root` are followed (so a test can link a
 * big file in). Keep-alive is on.
 *
 * Modes (`server.mode`, settable at any time; read when a request arrives):
 * - 'normal': as above.
 * - 'drop': a satisfiable range GET (206) whose (file, Range header) has been dropped fewer than `dropTimes`
 *   times is dropped: the full headers, then the first floor(length/2) body bytes (flushed to the socket), then the
 *   socket is destroyed, so the client's body read fails mid-body. Retrying the same range afterwards succeeds.
 *   GETs without Range, HEADs and 416s are never dropped. drops() counts them; log entries get `dropped: true`.
 * - 'ignore-range': every GET and HEAD is answered 200 with the whole file, Range ignored (still advertising
 *   `Accept-Ranges: bytes`, as misconfigured servers and proxies do).
 * - 'flaky-5xx': the first `flakyTimes` requests for each distinct (method, file, Range header) get 503 with
 *   `Retry-After: 0`; later ones are answered as in 'normal'. Only existing files are flaky (404s stay 404s).
 * - 'grow': the first request (GET or HEAD, any Range) for a file while in this mode sees the file as it is; every
 *   later one sees it one byte longer: total = real size + 1 in Content-Range/Content-Length/ETag, the extra last
 *   byte reads as 0x00 (so `bytes=size-size` is a 206 of one zero byte, a plain GET returns size+1 bytes). It grows
 *   only once, and reset() forgets which files have grown.
 *
 * @param {string} root the folder to serve (must exist)
 * @param {{port?: number, mode?: string, dropTimes?: number, flakyTimes?: number, logLimit?: number}} [options]
 *   port 0 (default) picks a free one; mode defaults to 'normal'; dropTimes and flakyTimes default to 1 (times each
 *   distinct request is dropped or gets 503); logLimit (default 10000) bounds `log` to the latest entries.
 * @returns {Promise<RangeServer>}
 */
export async function serveFiles(root, options = {}) {
  root = resolve(root);
  if (!statSync(root, { throwIfNoEntry: false })?.isDirectory()) throw new Error(`serveFiles: ${root} is no folder`);
  const { port = 0, dropTimes = 1, flakyTimes = 1, logLimit = 10000 } = options;
  let mode = checkMode(options.mode ?? 'normal');
  // File requests being answered now, and the most at once since the last reset().
  let inFlight = 0;
  let maxInFlight = 0;
  const stats = new Map(); // relPath -> {bytes, requests, drops}
  const dropped = new Map(); // 'file\0range' -> times dropped
  const failed = new Map(); // 'method\0file\0range' -> times answered 503
  const grown = new Set(); // files already seen once in 'grow' mode
  const log = [];

  const statsOf = (key) => {
    let s = stats.get(key);
    if (!s) stats.set(key, (s = { bytes: 0, requests: 0, drops: 0 }));
    return s;
  };
  const sum = (field, relPath) => {
    if (relPath === undefined) return [...stats.values()].reduce((total, s) => total + s[field], 0);
    return stats.get(keyOf(relPath))?.[field] ?? 0;
  };
  const record = (entry) => {
    if (log.length >= logLimit) log.splice(0, log.length - logLimit + 1);
    log.push(entry);
  };
  /** The absolute path of `segs` under root, or null if it resolves outside. */
  const inside = (segs) => {
    const abs = resolve(root, ...segs);
    return abs === root || abs.startsWith(root + sep) ? abs : null;
  };

  const server = createServer((req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) fail(req, res, 500);
      else res.destroy();
    });
  });
  server.keepAliveTimeout = 30_000;

  async function handle(req, res) {
    const range = req.headers.range ?? null;
    const rawPath = req.url.split('?')[0];
    const entry = { method: req.method, path: rawPath, range, status: 0 };
    const reply = (status, extra) => {
      entry.status = status;
      record(entry);
      fail(req, res, status, extra);
    };
    if (req.method === 'OPTIONS') {
      entry.status = 204;
      record(entry);
      const pna = req.headers['access-control-request-private-network'] === 'true';
      res.writeHead(204, {
        ...CORS,
        ...PREFLIGHT,
        ...(pna && { 'access-control-allow-private-network': 'true' }),
        'cache-control': 'no-store',
      });
      return res.end();
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, { allow: 'GET, HEAD, OPTIONS' });
    if (!rawPath.startsWith('/')) return reply(400);
    let segs;
    try {
      segs = segments(rawPath, true);
    } catch {
      return reply(400);
    }
    if (!segs) return reply(403);
    const key = segs.join('/');
    entry.path = key;
    if (segs[0] === MANIFEST_PREFIX) return sendManifest(req, res, segs.slice(1), entry, reply);
    const file = inside(segs);
    if (!file) return reply(403);
    if (req.method === 'GET') statsOf(key).requests++;
    const info = await stat(file).catch(() => null);
    if (!info?.isFile()) return reply(404);

    api.onRequest?.({ method: req.method, path: key, range });
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    res.once('close', () => inFlight--);
    if (api.delayMs > 0) await new Promise((ok) => setTimeout(ok, api.delayMs));
    const now = mode;
    if (now === 'flaky-5xx') {
      const k = `${req.method}\0${key}\0${range ?? ''}`;
      const n = failed.get(k) ?? 0;
      if (n < flakyTimes) {
        failed.set(k, n + 1);
        return reply(503, { 'retry-after': '0' });
      }
    }
    const realSize = info.size;
    let size = realSize;
    if (now === 'grow') {
      if (grown.has(key)) size += 1;
      else grown.add(key);
    }
    const headers = {
      ...CORS,
      'cache-control': 'no-store',
      'accept-ranges': 'bytes',
      'content-type': extname(file).toLowerCase() === '.json' ? 'application/json' : 'application/octet-stream',
      etag: `"${size.toString(16)}-${Math.trunc(info.mtimeMs).toString(16)}"`,
    };
    let status = 200;
    let start = 0;
    let end = size - 1;
    if (range !== null && now !== 'ignore-range') {
      const r = parseRange(range, size);
      if (r === UNSATISFIABLE) {
        entry.status = 416;
        record(entry);
        res.writeHead(416, { ...headers, 'content-range': `bytes */${size}`, 'content-length': 0 });
        return res.end();
      }
      if (r) {
        ({ start, end } = r);
        status = 206;
        headers['content-range'] = `bytes ${start}-${end}/${size}`;
      }
    }
    const length = end - start + 1;
    headers['content-length'] = length;
    let send = length;
    if (now === 'drop' && status === 206 && req.method === 'GET') {
      const k = `${key}\0${range}`;
      const n = dropped.get(k) ?? 0;
      if (n < dropTimes) {
        dropped.set(k, n + 1);
        statsOf(key).drops++;
        entry.dropped = true;
        send = Math.floor(length / 2);
      }
    }
    entry.status = status;
    record(entry);
    res.writeHead(status, headers);
    if (req.method === 'HEAD') return res.end();
    const sent = await sendBody(res, file, start, start + send - 1, realSize, (n) => (statsOf(key).bytes += n));
    // A drop, or a file that shrank under us: the client must see an error, not wait for the missing bytes.
    if (sent < length) res.destroy();
    else res.end();
  }

  function sendManifest(req, res, segs, entry, reply) {
    let list;
    try {
      list = api.manifest(segs.join('/'));
    } catch {
      return reply(404);
    }
    const body = Buffer.from(JSON.stringify(list));
    entry.status = 200;
    record(entry);
    res.writeHead(200, {
      ...CORS,
      'cache-control': 'no-store',
      'content-type': 'application/json',
      'content-length': body.length,
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  await new Promise((ok, err) => {
    server.once('error', err);
    server.listen(port, '127.0.0.1', ok);
  });
  const url = `http://127.0.0.1:${server.address().port}/`;

  /**
   * @typedef {object} RangeServer
   * @property {string} url the base URL, `http://127.0.0.1:PORT/`
   * @property {string} root the served folder, resolved
   * @property {number} port
   * @property {string} mode one of MODES; settable at any time (an unknown mode throws)
   * @property {{method: string, path: string, range: string|null, status: number, dropped?: true}[]} log every
   *   request, oldest first, the latest `logLimit` kept (path is the decoded path relative to root)
   * @property {(relPath: string) => string} urlOf the absolute URL of a file, each path segment percent-encoded
   * @property {(relPath?: string) => number} bytesSent file body bytes written to sockets (for one file or all):
   *   counted when handed to the socket, minus writes that failed. Exact for complete responses and drops; a
   *   client that aborts mid-body may be over-counted by what was in flight (a chunk plus socket buffers). Error
   *   bodies, headers and manifests are not counted; grow's padding byte is.
   * @property {(relPath?: string) => number} requests GET requests for a file path (or all), whatever their answer
   * @property {(relPath?: string) => number} drops responses dropped in 'drop' mode (for one file or all)
   * @property {() => void} reset zeroes the counters, empties `log` (same array) and forgets drops, 503s and grown
   *   files; the mode is kept
   * @property {(relFolder?: string) => {path: string, url: string}[]} manifest every regular file (or symlink to
   *   one) under relFolder, recursively (symlinked folders are not entered), sorted by path; path is relative to
   *   the folder's parent, so the folder's name comes first ('actor/iter_0000001/mp_rank_00/model_optim_rng.pt'
   *   for 'actor'; relative to root for '' or '.'). Throws if relFolder is no folder inside root.
   * @property {() => Promise<void>} close stops listening and destroys every connection, idle or busy
   * @property {((req: {method: string, path: string, range: string|null}) => void) | null} onRequest called for
   *   each request for an existing file just before its mode is read, so a test can change the mode at a given
   *   request (null by default)
   * @property {number} delayMs each request for an existing file waits this long before it is answered (a distant
   *   server's latency; 0 by default)
   * @property {() => number} maxInFlight the most requests for files answered at once since the last reset()
   */
  const api = {
    onRequest: null,
    delayMs: 0,
    maxInFlight: () => maxInFlight,
    url,
    root,
    port: server.address().port,
    get mode() {
      return mode;
    },
    set mode(value) {
      mode = checkMode(value);
    },
    log,
    urlOf(relPath) {
      return url + segmentsOrThrow(relPath).map(encodeURIComponent).join('/');
    },
    bytesSent: (relPath) => sum('bytes', relPath),
    requests: (relPath) => sum('requests', relPath),
    drops: (relPath) => sum('drops', relPath),
    reset() {
      maxInFlight = inFlight;
      stats.clear();
      dropped.clear();
      failed.clear();
      grown.clear();
      log.length = 0;
    },
    manifest(relFolder = '') {
      const segs = segmentsOrThrow(relFolder);
      const dir = inside(segs);
      if (!dir || !statSync(dir, { throwIfNoEntry: false })?.isDirectory()) {
        throw new Error(`manifest: ${relFolder} is no folder under ${root}`);
      }
      const top = segs.length ? `${segs.at(-1)}/` : '';
      const base = segs.length ? `${segs.join('/')}/` : '';
      const files = [];
      walk(dir, '', files);
      return files.sort().map((sub) => ({ path: top + sub, url: api.urlOf(base + sub) }));
    },
    close() {
      return new Promise((ok) => {
        server.close(() => ok());
        // Keep-alive sockets (and responses still streaming) would hold close() open.
        server.closeAllConnections();
      });
    },
  };
  return api;
}

function checkMode(mode) {
  if (!MODES.includes(mode)) throw new Error(`rangeserver: unknown mode ${mode} (one of ${MODES.join(', ')})`);
  return mode;
}

/**
 * Splits a path at '/' ('' and '.' segments dropped), percent-decoding each segment if `decode` (a bad escape
 * throws URIError). Null if a segment is '..' or (decoded) holds a '/' or NUL.
 */
function segments(path, decode) {
  const out = [];
  for (const raw of path.split('/')) {
    const seg = decode ? decodeURIComponent(raw) : raw;
    if (seg === '' || seg === '.') continue;
    if (seg === '..' || seg.includes('/') || seg.includes('\0')) return null;
    out.push(seg);
  }
  return out;
}

function segmentsOrThrow(relPath) {
  const segs = segments(String(relPath), false);
  if (!segs) throw new Error(`rangeserver: ${relPath} leaves the served folder`);
  return segs;
}

function keyOf(relPath) {
  return segments(String(relPath), false)?.join('/') ?? '';
}

/** Appends to `out` the '/'-joined paths (under `prefix`) of the regular files below `dir`, symlinks followed. */
function walk(dir, prefix, out) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const rel = prefix + entry.name;
    const abs = join(dir, entry.name);
    if (entry.isDirectory()) walk(abs, `${rel}/`, out);
    else if (entry.isFile() || (entry.isSymbolicLink() && statSync(abs, { throwIfNoEntry: false })?.isFile())) {
      out.push(rel);
    }
  }
}

/**
 * Parses a Range header against a file size: {start, end} (inclusive), UNSATISFIABLE (answer 416), or null for a
 * unit other than bytes (ignore the header).
 */
function parseRange(header, size) {
  const unit = /^\s*([^=\s]+)\s*=(.*)$/.exec(header);
  if (!unit) return UNSATISFIABLE;
  if (unit[1].toLowerCase() !== 'bytes') return null;
  const specs = unit[2].split(',');
  if (specs.length !== 1) return UNSATISFIABLE;
  const m = /^\s*(\d*)\s*-\s*(\d*)\s*$/.exec(specs[0]);
  if (!m || (m[1] === '' && m[2] === '') || size === 0) return UNSATISFIABLE;
  if (m[1] === '') {
    const n = Number(m[2]);
    return n === 0 ? UNSATISFIABLE : { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const last = m[2] === '' ? Infinity : Number(m[2]);
  if (last < start || start >= size) return UNSATISFIABLE;
  return { start, end: Math.min(last, size - 1) };
}

/**
 * Streams bytes [from, to] of `file` to `res`, honouring backpressure; bytes at or past `realSize` are zeros
 * (grow's padding). `count(n)` is told of every body byte handed to the socket (negative for a failed write).
 * With nothing to send, still flushes the headers. Resolves, once the last write reached the socket or the
 * client went away, to the number of bytes written.
 */
async function sendBody(res, file, from, to, realSize, count) {
  let gone = false;
  const onClose = () => (gone = true);
  res.once('close', onClose);
  let sent = 0;
  let last = Promise.resolve();
  const write = (chunk) => {
    count(chunk.length);
    sent += chunk.length;
    let ok;
    last = new Promise((done) => {
      ok = res.write(chunk, (err) => {
        if (err) count(-chunk.length);
        done();
      });
    });
    return ok;
  };
  const closedOr = (promise) =>
    new Promise((ok) => {
      const done = () => {
        res.off('close', done);
        res.off('drain', done);
        ok();
      };
      res.once('close', done);
      if (promise) promise.then(done);
      else res.once('drain', done);
    });
  try {
    const realTo = Math.min(to, realSize - 1);
    if (from <= realTo) {
      for await (const chunk of createReadStream(file, { start: from, end: realTo, highWaterMark: CHUNK })) {
        if (gone) break;
        if (!write(chunk)) await closedOr(null);
      }
    }
    if (!gone && to >= realSize && from <= to) write(Buffer.alloc(1));
    if (!gone && sent === 0) write(Buffer.alloc(0)); // headers only (a drop of a 1-byte range)
    await closedOr(last);
  } finally {
    res.off('close', onClose);
  }
  return sent;
}

function fail(req, res, status, extra = {}) {
  const body = String(status);
  res.writeHead(status, {
    ...CORS,
    'cache-control': 'no-store',
    'content-type': 'text/plain',
    'content-length': body.length,
    ...extra,
  });
  res.end(req.method === 'HEAD' ? undefined : body);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [root, port = '0', mode = 'normal'] = process.argv.slice(2);
  if (root) {
    const server = await serveFiles(root, { port: Number(port), mode });
    console.log(server.url);
    console.error(`rangeserver: serving ${server.root} in mode ${server.mode}; Ctrl-C stops`);
    for (const signal of ['SIGINT', 'SIGTERM']) {
      process.once(signal, async () => {
        console.error(`rangeserver: ${server.requests()} GETs, ${server.bytesSent()} body bytes sent`);
        await server.close();
        process.exit(0);
      });
    }
  } else if (!process.env.NODE_TEST_CONTEXT) {
    console.error(`usage: node web/test/rangeserver.mjs ROOT [port] [mode: ${MODES.join('|')}]`);
    process.exitCode = 2;
  }
}
