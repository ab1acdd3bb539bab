// The subset of fetch() that range.js's UrlFile uses, for Node: GETs whose body is handed over chunk by chunk
// (`body.each(fn)`, synchronously, no promise per chunk). Plain-http answers with a Content-Length are read from a
// keep-alive socket straight out of one reused 1 MiB buffer (net's `onread`): hand-written on purpose, because
// node:http allocates every 64 KiB chunk and moved range answers from a local server at 600-940 MB/s where this
// read 1.9 GB/s (8 MiB ranges, one at a time), and `npx ckptconv` reads URLs at the client's speed. Everything
// else (https, chunked bodies) goes through node:http/node:https.
//
// `fn(chunk, claim)`: a chunk read straight into the connection's buffer comes with `claim(next)`, which keeps the
// chunk's memory for the caller (a writer thread writes it where it was received, no copy) and gives the
// connection `next` to read into from then on; a chunk without `claim` is valid only during the call. When `fn`
// returns a promise, reading pauses until it settles (a writer that is behind).
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';

const agents = { 'http:': new http.Agent({ keepAlive: true }), 'https:': new https.Agent({ keepAlive: true }) };
const READ_BUFFER = 1 << 20;
const MAX_HEAD = 64 << 10;
/** Idle keep-alive connections by host:port. */
const idle = new Map();

/** fetch(url, {headers, signal}) for GETs: resolves to {status, headers: {get}, body: {each, cancel}}. */
export function nodeFetch(url, init = {}) {
  const u = new URL(url);
  return u.protocol === 'http:' ? rawGet(u, init) : moduleGet(u, init);
}

/** A GET through node:http or node:https. */
function moduleGet(u, { headers = {}, signal } = {}) {
  const lib = u.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const req = lib.get(u, { headers, signal, agent: agents[u.protocol] }, (res) => {
      let used = false;
      resolve({
        status: res.statusCode,
        headers: { get: (name) => res.headers[name.toLowerCase()] ?? null },
        body: {
          each: (fn) => {
            used = true;
            return new Promise((ok, fail) => {
              res.on('data', (chunk) => {
                try {
                  fn(chunk);
                } catch (e) {
                  res.destroy();
                  fail(e);
                }
              });
              res.on('end', ok);
              res.on('error', fail);
              res.on('close', () => (res.complete ? ok() : fail(new Error('the connection closed mid-body'))));
            });
          },
          cancel: async () => used || res.destroy(),
        },
      });
    });
    req.on('error', reject);
  });
}

/** A keep-alive connection to `host:port` reading into one reused buffer; `on` routes its events. */
function connect(host, port) {
  const conn = { host, port, on: null, closed: false, buffer: Buffer.allocUnsafe(READ_BUFFER) };
  conn.socket = net.connect({
    host,
    port,
    // Returning false pauses reading: the buffer then holds bytes not yet handed on. Node asks for the buffer of
    // the next read right after each callback: a claimed chunk's replacement, else the same one.
    onread: { buffer: () => conn.buffer, callback: (n, buf) => conn.on?.data(buf.subarray(0, n), true) !== false },
  });
  conn.socket.on('error', (e) => conn.on?.error(e));
  conn.socket.on('close', () => {
    conn.closed = true;
    const list = idle.get(`${host}:${port}`);
    if (list?.includes(conn)) list.splice(list.indexOf(conn), 1);
    conn.on?.error(new Error('the connection closed'));
  });
  return conn;
}

/** A plain-http GET on a pooled connection; bodies without a Content-Length go through node:http instead. */
function rawGet(u, { headers = {}, signal } = {}) {
  const port = Number(u.port || 80);
  const key = `${u.hostname}:${port}`;
  const conn = idle.get(key)?.pop() ?? connect(u.hostname, port);
  // Keeps the event loop alive while the answer is awaited (an idle connection does not).
  conn.socket.ref();
  const lines = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`);
  conn.socket.write(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\n${lines.join('')}\r\n`);
  return new Promise((resolve, reject) => {
    let head = Buffer.alloc(0);
    let early = null; // body bytes that came with the head: a view of the paused read buffer
    let sink = null; // {fn, ok, fail} once each() is called
    let left = 0; // body bytes still to come
    let done = false;
    let failure = null; // an error before each() was called: each() rejects with it
    const finish = (error) => {
      if (done) return;
      done = true;
      conn.on = null;
      signal?.removeEventListener('abort', abort);
      if (error) conn.socket.destroy();
      if (error) {
        failure = error;
        return sink ? sink.fail(error) : reject(error);
      }
      if (reuse && !conn.closed) {
        conn.socket.resume(); // it may have paused at this answer's head
        conn.socket.unref();
        (idle.get(key) ?? idle.set(key, []).get(key)).push(conn);
      } else conn.socket.destroy();
      sink?.ok();
    };
    const abort = () => finish(signal.reason ?? new Error('aborted'));
    signal?.addEventListener('abort', abort, { once: true });
    let reuse = true;
    /** Hands on body bytes; `direct`: read just now into the connection's buffer (they may be claimed). */
    const body = (chunk, direct) => {
      const n = Math.min(chunk.length, left);
      left -= n;
      let wait = null;
      if (n) {
        // Reading is paused from the head until each() is called, so a reader is there for every body byte.
        if (!sink) return finish(new Error('body bytes arrived before anything read them'));
        // Claimable only when the whole read is body: bytes of the next answer may follow in the same buffer.
        const claim = direct && n === chunk.length ? (next) => void (conn.buffer = next) : undefined;
        try {
          wait = sink.fn(chunk.subarray(0, n), claim);
        } catch (e) {
          return finish(e);
        }
      }
      if (left === 0) return finish();
      if (typeof wait?.then !== 'function') return undefined;
      wait.then(() => done || conn.socket.resume());
      return false;
    };
    conn.on = {
      error: (e) => finish(e),
      data: (chunk, direct) => {
        if (sink || head === null) return body(chunk, direct);
        // Only the head is copied; the body bytes after it stay in the read buffer.
        const seen = head.length;
        head = Buffer.concat([head, chunk.subarray(0, MAX_HEAD)]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return head.length >= MAX_HEAD ? finish(new Error('an answer head over 64 KiB')) : undefined;
        const [status, ...rest] = head.toString('latin1', 0, end).split('\r\n');
        const code = Number(/^HTTP\/1\.[01] (\d{3})/.exec(status)?.[1]);
        const fields = new Map();
        for (const line of rest) {
          const colon = line.indexOf(':');
          if (colon > 0) fields.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
        }
        const after = chunk.subarray(end + 4 - seen);
        head = null;
        const length = fields.get('content-length');
        if (!code || fields.has('transfer-encoding') || !/^\d+$/.test(length ?? '')) {
          // Not a body this reader frames: ask again through node:http.
          done = true;
          conn.on = null;
          conn.socket.destroy();
          signal?.removeEventListener('abort', abort);
          return moduleGet(u, { headers, signal }).then(resolve, reject);
        }
        reuse = !/close/i.test(fields.get('connection') ?? '');
        left = Number(length);
        resolve({
          status: code,
          headers: { get: (name) => fields.get(name.toLowerCase()) ?? null },
          body: {
            each: (fn) =>
              new Promise((ok, fail) => {
                if (failure) return fail(failure);
                if (done) return ok();
                sink = { fn, ok, fail };
                const pending = early;
                early = null;
                const paused = pending.length ? body(pending, false) === false : false;
                if (!done && !paused) conn.socket.resume();
              }),
            // Not reading the body: the connection cannot be reused.
            cancel: async () => finish(new Error('cancelled')),
          },
        });
        if (left === 0) return finish();
        // Reading pauses until each() takes these bytes (maybe none yet) or cancel() drops the connection.
        early = after;
        return false;
      },
    };
  });
}
