// Reading files behind http(s) URLs with Range requests: asynchronously for the npm package (UrlFile, in Node or a
// browser's main thread) and synchronously for the engine's worker in a browser, the page's and the package's
// (xhrSource, xhrRead). Every answer is checked: a server that ignores
// Range (200 with the whole file) or a file whose length or ETag changes mid-run is an error naming the URL, not
// bytes of the wrong file. Network errors and 5xx answers are retried a bounded number of times, resuming after
// the bytes already received.

/** Tries per range: the first and this many minus one retries. */
export const TRIES = 5;
/** Requests per range at most, however many of them brought bytes before failing. */
const MAX_REQUESTS = 64;
/** Pause before retry n (ms): 100, 200, 400, 800. */
const backoff = (n) => 100 << n;
/** The longest single request: big enough for throughput, small enough that a retry repeats little. */
export const MAX_PIECE = 16 << 20;
/**
 * Small reads of a URL (headers) are served from blocks this size, two at a time: small, since planning a zip
 * reads 30 bytes at each of hundreds of scattered entries.
 */
export const URL_BLOCK = 4 << 10;

/** An error about one URL (its message names it), marked retryable or not. */
export class UrlError extends Error {
  constructor(url, message, retry = false) {
    super(`${url}: ${message}`);
    /** The message without the URL, for callers that name the URL themselves. */
    this.detail = message;
    this.retry = retry;
  }
}

/** The URL as messages show it: without a query string (signed URLs carry secrets there). */
export function shownUrl(url) {
  const u = new URL(url);
  return `${u.origin}${u.pathname}`;
}

/** Parses `bytes a-b/total` (total may be `*`). */
function contentRange(v) {
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(v?.trim() ?? '');
  return m && { first: Number(m[1]), last: Number(m[2]), total: m[3] === '*' ? null : Number(m[3]) };
}

/**
 * Checks a range answer's status and headers (`get(name)`), for bytes `offset .. offset + len` of a file that had
 * `size` bytes and `etag` when opened (size null when probing). Throws a UrlError; returns the total.
 */
function checkAnswer(shown, status, get, offset, len, size, etag) {
  if (status >= 500 || status === 408 || status === 429)
    throw new UrlError(shown, `the server answered ${status}`, true);
  if (status === 200)
    throw new UrlError(
      shown,
      'the server ignored the Range header (it answered 200 with the whole file): ckptconv reads URLs with HTTP ' +
        'range requests; use a server that supports them (and, from a web page, allows the Range header by CORS)',
    );
  if (status === 416) throw new UrlError(shown, `the file is shorter than the ${size} bytes it had when opened`);
  if (status !== 206) throw new UrlError(shown, `the server answered ${status} to a range request`);
  const cr = contentRange(get('content-range'));
  if (!cr)
    throw new UrlError(
      shown,
      'a range answer without a readable Content-Range header (from a web page, the server must expose it by CORS: ' +
        'Access-Control-Expose-Headers: Content-Range)',
    );
  if (cr.first !== offset || cr.last !== offset + len - 1)
    throw new UrlError(shown, `asked for bytes ${offset}-${offset + len - 1} but got ${cr.first}-${cr.last}`);
  if (cr.total == null) throw new UrlError(shown, 'the server does not say how long the file is (Content-Range */)');
  if (size != null && cr.total !== size)
    throw new UrlError(shown, `the file changed while it was read: it had ${size} bytes, now ${cr.total}`);
  const tag = get('etag');
  if (etag && tag && tag !== etag)
    throw new UrlError(shown, `the file changed while it was read (its ETag was ${etag}, now ${tag})`);
  return cr.total;
}

/**
 * Whether a failed try `attempt` (counted from 0) is tried again: a retryable UrlError before the last try. A
 * retryable error that used up the tries says so in its message.
 */
function retrying(e, attempt) {
  if (e instanceof UrlError && e.retry && attempt + 1 < TRIES) return true;
  if (e instanceof UrlError && e.retry) {
    e.message += ` (after ${TRIES} tries)`;
    e.detail += ` (after ${TRIES} tries)`;
  }
  return false;
}

/** The next chunk of a fetch Response's body (its reader made on first use). */
function reader(res) {
  res.chunks ??= res.body.getReader();
  return res.chunks.read();
}

/** An error thrown by a stream()'s receiver: passed on as it is, never retried. */
class PutError extends Error {
  constructor(cause) {
    super(cause?.message ?? String(cause));
    this.cause = cause;
  }
}

const sleep = (ms, signal) =>
  new Promise((ok, fail) => {
    const t = setTimeout(ok, ms);
    signal?.addEventListener('abort', () => (clearTimeout(t), fail(signal.reason)), { once: true });
  });

/**
 * A file behind a URL, read with Range requests: `await UrlFile.open(url, {signal, fetch})`, then `read(offset,
 * len)` or `range(offset, len)`; `fetched` counts the bytes received.
 */
export class UrlFile {
  static async open(url, { signal, fetch = globalThis.fetch } = {}) {
    const shown = shownUrl(url);
    const f = new UrlFile(url, shown, signal, fetch);
    // One byte first: learns the size and the ETag, and whether Range is honoured, before anything else is asked.
    const { total, etag } = await f.request(0, 1, null, null);
    f.size = total;
    f.etag = etag;
    return f;
  }

  constructor(url, shown, signal, fetch) {
    this.url = url;
    this.shown = shown;
    this.signal = signal;
    this.fetch = fetch;
    this.fetched = 0;
  }

  /**
   * Bytes `offset .. offset + len` (one request; after a failure, the rest is asked again): resolves to {bytes,
   * total, etag}. A try that brought bytes starts the count of tries afresh (up to MAX_REQUESTS requests in all).
   */
  async request(offset, len, size, etag) {
    // A recycled buffer at least this long, seen through a view of `len` bytes (the last piece of a range is short).
    const at = this.pool?.findIndex((b) => b.byteLength >= len) ?? -1;
    const out = at >= 0 ? new Uint8Array(this.pool.splice(at, 1)[0], 0, len) : new Uint8Array(len);
    // Copied at once: a chunk may be a view of a buffer its transport reuses (js/nodefetch.js).
    const meta = await this.transfer(offset, len, size, etag, (chunk, at) => out.set(chunk, at));
    return { bytes: out, ...meta };
  }

  /**
   * Hands bytes `offset .. offset + len` to `put(chunk, at, claim)` as they arrive (`at` counted from `offset`), in
   * order, each byte once, retried like request(); an error `put` throws ends it as it is. A chunk is valid only
   * during the call unless it came with `claim` (js/nodefetch.js) and put claimed it; a promise put returns holds
   * the next chunks back until it settles. Resolves when all are handed over.
   */
  async stream(offset, len, put) {
    this.check(offset, len);
    if (len > 0) await this.transfer(offset, len, this.size, this.etag, put);
  }

  /** The checked requests, retries and resumption of request() and stream(): resolves to {total, etag}. */
  async transfer(offset, len, size, etag, put) {
    let got = 0;
    let requests = 0;
    for (let attempt = 0; ; attempt++) {
      const before = got;
      try {
        this.signal?.throwIfAborted();
        const res = await this.fetch(this.url, {
          headers: { range: `bytes=${offset + got}-${offset + len - 1}` },
          signal: this.signal,
          cache: 'no-store',
        }).catch((e) => {
          if (this.signal?.aborted) throw e;
          throw new UrlError(this.shown, `could not fetch (${e?.cause?.message ?? e?.message ?? e})`, true);
        });
        let total;
        try {
          total = checkAnswer(this.shown, res.status, (h) => res.headers.get(h), offset + got, len - got, size, etag);
        } catch (e) {
          await res.body?.cancel().catch(() => {});
          throw e;
        }
        size ??= total;
        etag ??= res.headers.get('etag');
        const take = (value, claim) => {
          if (got + value.length > len) throw new UrlError(this.shown, 'the server sent more bytes than asked for');
          // Its length first: a claimed chunk's memory may be handed to another thread (then it reads as empty).
          const n = value.length;
          let wait;
          try {
            wait = put(value, got, claim);
          } catch (e) {
            throw new PutError(e);
          }
          got += n;
          this.fetched += n;
          return wait;
        };
        try {
          // A body with each() (js/nodefetch.js) hands chunks over without a promise per chunk.
          if (res.body.each) await res.body.each(take);
          else for (let r; !(r = await reader(res)).done; ) take(r.value);
        } catch (e) {
          if (e instanceof PutError) throw e.cause;
          if (e instanceof UrlError || this.signal?.aborted) throw e;
          throw new UrlError(this.shown, `the connection broke after ${got} of ${len} bytes (${e?.message ?? e})`, true);
        }
        if (got !== len) throw new UrlError(this.shown, `the answer ended after ${got} of ${len} bytes`, true);
        return { total: size, etag };
      } catch (e) {
        requests++;
        if (got > before && requests < MAX_REQUESTS) attempt = -1;
        if (!retrying(e, attempt)) throw e;
        if (attempt >= 0) await sleep(backoff(attempt), this.signal);
      }
    }
  }

  /**
   * Bytes `offset .. offset + len` of the file: exactly those are fetched (in pieces of at most MAX_PIECE), nothing
   * speculatively, so that every byte a conversion needs is fetched once and no other.
   */
  async read(offset, len) {
    this.check(offset, len);
    if (len <= MAX_PIECE) return (await this.request(offset, len, this.size, this.etag)).bytes;
    const out = new Uint8Array(len);
    let at = 0;
    for await (const piece of this.range(offset, len)) {
      out.set(piece, at);
      at += piece.length;
    }
    return out;
  }

  /**
   * Bytes `offset .. offset + len` as an async iterator of pieces of at most MAX_PIECE: the next piece is fetched
   * while the caller uses this one (the extent is known, so nothing past it is asked for).
   */
  async *range(offset, len) {
    this.check(offset, len);
    const piece = (at) => {
      const p = this.request(offset + at, Math.min(MAX_PIECE, len - at), this.size, this.etag).then((r) => r.bytes);
      p.catch(() => {}); // reported when awaited
      return p;
    };
    let next = len > 0 ? piece(0) : null;
    for (let at = 0; at < len; ) {
      const bytes = await next;
      at += bytes.length;
      next = at < len ? piece(at) : null;
      yield bytes;
    }
  }

  /**
   * Gives back a buffer read() returned, once its bytes are used: a request of that size reuses it (a few are kept),
   * so streaming a range allocates nothing per piece and memory does not wait for the garbage collector.
   */
  recycle(bytes) {
    this.pool ??= [];
    if (bytes.buffer.byteLength >= 1 << 20 && this.pool.length < 4) this.pool.push(bytes.buffer);
  }

  check(offset, len) {
    if (!(offset >= 0 && len >= 0 && offset + len <= this.size))
      throw new UrlError(this.shown, `read of ${len} bytes at ${offset} is past the end (${this.size} bytes)`);
  }
}

/**
 * Synchronous range reads with XMLHttpRequest (only a dedicated worker may do that in a browser): bytes
 * `offset .. offset + len` of `url`, with the checks and bounded retries of UrlFile (retried at once: a worker
 * cannot sleep without cross-origin isolation). `size` and `etag` are what the file had when opened (null to probe);
 * returns {bytes, total, etag}.
 */
export function xhrRead(url, offset, len, size = null, etag = null) {
  const shown = shownUrl(url);
  for (let attempt = 0; ; attempt++) {
    try {
      const x = new XMLHttpRequest();
      x.open('GET', url, false);
      x.responseType = 'arraybuffer';
      x.setRequestHeader('Range', `bytes=${offset}-${offset + len - 1}`);
      try {
        x.send();
      } catch (e) {
        throw new UrlError(shown, `could not fetch (${e?.message ?? e})`, true);
      }
      if (x.status === 0) throw new UrlError(shown, 'could not fetch (a network error, or CORS refused it)', true);
      const total = checkAnswer(shown, x.status, (h) => x.getResponseHeader(h), offset, len, size, etag);
      const bytes = new Uint8Array(x.response);
      if (bytes.length !== len) throw new UrlError(shown, `the answer held ${bytes.length} of ${len} bytes`, true);
      return { bytes, total, etag: etag ?? x.getResponseHeader('etag') };
    } catch (e) {
      if (!retrying(e, attempt)) throw e;
    }
  }
}

/** A synchronous reader `{size, block, read}` of a URL for the engine, in a browser worker. */
export function xhrSource(url) {
  const first = xhrRead(url, 0, 1);
  const { total: size, etag } = first;
  return {
    size,
    block: URL_BLOCK,
    url,
    read(offset, len) {
      if (len === 0) return new Uint8Array(0);
      const out = new Uint8Array(len);
      for (let at = 0; at < len; at += MAX_PIECE) {
        const n = Math.min(MAX_PIECE, len - at);
        out.set(xhrRead(url, offset + at, n, size, etag).bytes, at);
      }
      return out;
    },
  };
}
