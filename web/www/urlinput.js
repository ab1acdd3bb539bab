// Inputs given as URLs (the page's URL fields and `?url=` / `?base=`): what a URL names, checked on the main thread
// before any worker reads it. A URL is a folder manifest, a JSON array of `{path, url}` (a hub's file listing;
// relative urls resolve against the manifest's), when its path ends in `.json` or its server answers
// `Content-Type: application/json` (or `…+json`) to a one-byte Range probe; otherwise it is one file, named by
// its last path segment. Either way the result is the engine's input list `[{path, url}]`, which the engine's
// worker reads with Range requests (range.js's xhrSource). Manifests are hostile input: every entry is checked.
import { TRIES, shownUrl } from './range.js';

/** Manifests bigger than this are refused (a listing of 100 000 files is a few MB). */
export const MAX_MANIFEST_BYTES = 16 << 20;
/** Manifests listing more files than this are refused. */
export const MAX_MANIFEST_ENTRIES = 100_000;
/** Longest path a manifest may give a file. */
const MAX_PATH = 4096;

/**
 * Why the page may not read `url`, or null: its CSP (connect-src, in index.html) allows https anywhere, but plain
 * http only on this machine or the page's own origin, so that nothing crosses a network unencrypted. Checked here
 * so the user reads that, rather than a network error after retries.
 */
export function notReadable(url) {
  const u = new URL(url);
  if (u.protocol === 'https:') return null;
  if (u.protocol !== 'http:') return `${u.protocol} URLs cannot be read: give an http:// or https:// address`;
  if (u.hostname === 'localhost' || u.hostname === '127.0.0.1') return null;
  if (globalThis.location?.origin === u.origin) return null;
  return 'plain http:// is read only from this machine (localhost, 127.0.0.1): give an https:// address';
}

/** `text` as an http(s) URL, or an Error saying why not. */
export function httpUrl(text) {
  const s = String(text ?? '').trim();
  let url;
  try {
    url = new URL(s);
  } catch {
    throw new Error(`'${s}' is not a URL (give a full http:// or https:// address)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    throw new Error(`${url.protocol} URLs cannot be read: give an http:// or https:// address`);
  return url;
}

/**
 * The input path of a file URL: its last path segment, percent-decoded (left encoded if the decoded form would
 * be a folder path or is not valid UTF-8). A URL ending in `/` names no file.
 */
export function fileNameOfUrl(url) {
  const u = new URL(url);
  const raw = u.pathname.split('/').pop();
  if (!raw) throw new Error(`${shownUrl(u.href)}: the URL names no file (it ends in /); for a folder give a manifest`);
  let name;
  try {
    name = decodeURIComponent(raw);
  } catch {
    return raw;
  }
  return /[/\\]/.test(name) || name === '.' || name === '..' || /[\0-\x1f]/.test(name) ? raw : name;
}

/** Why `path` (a manifest entry's) is refused, or null: it must be a plain relative file path. */
function badPath(path) {
  if (typeof path !== 'string' || path === '') return 'no path (a non-empty string)';
  if (path.length > MAX_PATH) return `a path longer than ${MAX_PATH} characters`;
  if (/[\0-\x1f\x7f]/.test(path)) return 'a path with control characters';
  if (path.includes('\\')) return 'a path with a backslash (use /)';
  if (path.startsWith('/') || /^[a-z]:/i.test(path)) return 'an absolute path (paths are relative to the folder)';
  const segs = path.split('/');
  if (segs.includes('..')) return 'a path with a .. segment';
  if (segs.some((s) => s === '' || s === '.')) return 'a path with an empty or . segment';
  return null;
}

/**
 * Checks a parsed manifest (`list`, from `manifestUrl`) and returns the engine's inputs `[{path, url}]`, each url
 * absolute. Throws an Error naming the manifest (and the entry) for anything but an array of `{path, url}` with
 * plain relative paths, each once, and http(s) urls.
 */
export function manifestInputs(list, manifestUrl) {
  const shown = shownUrl(manifestUrl);
  const bad = (why) => new Error(`${shown}: not a folder manifest: ${why}`);
  if (!Array.isArray(list)) throw bad('expected a JSON array of {"path", "url"} objects');
  if (list.length === 0) throw bad('it lists no files');
  if (list.length > MAX_MANIFEST_ENTRIES) throw bad(`it lists ${list.length} files, more than ${MAX_MANIFEST_ENTRIES}`);
  const seen = new Set();
  return list.map((entry, i) => {
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry))
      throw bad(`entry ${i} is not a {"path", "url"} object`);
    const { path, url } = entry;
    const pathWhy = badPath(path);
    if (pathWhy) throw bad(`entry ${i} has ${pathWhy}${typeof path === 'string' ? `: '${path.slice(0, 200)}'` : ''}`);
    if (seen.has(path)) throw bad(`entry ${i}: '${path}' is listed twice`);
    seen.add(path);
    if (typeof url !== 'string' || url === '') throw bad(`entry ${i} ('${path}') has no url (a string)`);
    let abs;
    try {
      abs = new URL(url, manifestUrl);
    } catch {
      throw bad(`entry ${i} ('${path}') has a url that is not one: '${url.slice(0, 200)}'`);
    }
    if (abs.protocol !== 'http:' && abs.protocol !== 'https:')
      throw bad(`entry ${i} ('${path}') has a ${abs.protocol} url; only http(s) URLs can be read`);
    const why = notReadable(abs);
    if (why) throw bad(`entry ${i} ('${path}') has the url ${shownUrl(abs.href)}: ${why}`);
    return { path, url: abs.href };
  });
}

/** Whether a Content-Type names JSON (application/json, or a `+json` type). */
export const isJsonType = (type) => /^\s*application\/([\w.-]+\+)?json\s*(;|$)/i.test(type ?? '');

/** A Response of `fetch(url, init)`, retried (at most TRIES tries) on network errors, 5xx, 408 and 429. */
async function fetchRetried(url, init, fetch) {
  const shown = shownUrl(url);
  for (let attempt = 1; ; attempt++) {
    let res = null;
    let why;
    try {
      res = await fetch(url, { cache: 'no-store', ...init });
      if (!(res.status >= 500 || res.status === 408 || res.status === 429)) return res;
      why = `the server answered ${res.status}`;
      await res.body?.cancel().catch(() => {});
    } catch (e) {
      if (init.signal?.aborted) throw e;
      why =
        `could not fetch it (${e?.message ?? e}): a network error, or its server does not let this page read it ` +
        '(CORS: Access-Control-Allow-Origin)';
    }
    if (attempt >= TRIES) throw new Error(`${shown}: ${why}${TRIES > 1 ? ` (after ${TRIES} tries)` : ''}`);
    await new Promise((ok) => setTimeout(ok, 50 << attempt));
  }
}

/** An answer that is not a success, as an Error naming the URL. */
function refused(url, res) {
  const hint = res.status === 404 ? ' (not found)' : res.status === 401 || res.status === 403 ? ' (not allowed)' : '';
  return new Error(`${shownUrl(url)}: the server answered ${res.status}${hint}`);
}

/** Reads a manifest's answer `res` (a 200 of `url`) into the engine's inputs. */
async function manifestFrom(url, res) {
  const shown = shownUrl(url);
  const length = Number(res.headers.get('content-length'));
  if (length > MAX_MANIFEST_BYTES) {
    await res.body?.cancel().catch(() => {});
    throw new Error(`${shown}: the manifest has ${length} bytes, more than ${MAX_MANIFEST_BYTES}`);
  }
  const text = await res.text();
  if (text.length > MAX_MANIFEST_BYTES) {
    throw new Error(`${shown}: the manifest is bigger than ${MAX_MANIFEST_BYTES} bytes`);
  }
  let list;
  try {
    list = JSON.parse(text);
  } catch (e) {
    throw new Error(`${shown}: not a folder manifest: not valid JSON (${e.message})`);
  }
  return manifestInputs(list, url);
}

/**
 * Opens `text` (what the user typed, or `?url=`): resolves to `{kind: 'file', url, size, inputs}` (size as the
 * server says, or null) or `{kind: 'manifest', url, inputs}`, with `inputs` the engine's `[{path, url}]`; rejects
 * with an Error naming the URL. With `manifestOnly` (a base model folder), a URL that is not a manifest is refused.
 * A URL whose path ends in `.json` is fetched whole as a manifest; any other is first asked for its first byte,
 * and is a manifest if the answer is JSON. The probe's body is never read: a server that ignores Range (answering
 * with the whole file) costs the headers only, and the engine's reader then says what is wrong.
 */
export async function openUrl(text, { fetch = globalThis.fetch.bind(globalThis), signal, manifestOnly = false } = {}) {
  const url = httpUrl(text).href;
  const why = notReadable(url);
  if (why) throw new Error(`${shownUrl(url)}: ${why}`);
  if (/\.json$/i.test(new URL(url).pathname)) {
    const res = await fetchRetried(url, { signal }, fetch);
    if (!res.ok) throw refused(url, res);
    return { kind: 'manifest', url, inputs: await manifestFrom(url, res) };
  }
  const probe = await fetchRetried(url, { signal, headers: { range: 'bytes=0-0' } }, fetch);
  if (!probe.ok && probe.status !== 416) {
    await probe.body?.cancel().catch(() => {});
    throw refused(url, probe);
  }
  if (isJsonType(probe.headers.get('content-type'))) {
    // A listing endpoint answers 200 with all of it; a JSON file whose server honours Range, 206 with one byte.
    if (probe.status === 200) return { kind: 'manifest', url, inputs: await manifestFrom(url, probe) };
    await probe.body?.cancel().catch(() => {});
    const res = await fetchRetried(url, { signal }, fetch);
    if (!res.ok) throw refused(url, res);
    return { kind: 'manifest', url, inputs: await manifestFrom(url, res) };
  }
  await probe.body?.cancel().catch(() => {});
  if (manifestOnly) {
    throw new Error(
      `${shownUrl(url)}: not a folder manifest (a URL ending in .json, or answered as application/json); a base ` +
        'model is a folder: give the URL of a JSON list of its files, [{"path", "url"}]',
    );
  }
  const total = /\/(\d+)\s*$/.exec(probe.headers.get('content-range') ?? '')?.[1];
  const length = probe.status === 200 ? probe.headers.get('content-length') : null;
  const size = total != null ? Number(total) : length != null ? Number(length) : null;
  return { kind: 'file', url, size, inputs: [{ path: fileNameOfUrl(url), url }] };
}

/**
 * The summary line of an opened URL: "model.pt (1.20 GB) from https://host/…/model.pt" or "12 files in actor/ from
 * the manifest https://host/…". The URL is shown without its query (signed URLs carry secrets there); the caller
 * passes it through displaySafe.
 */
export function describeUrlInput(opened, formatBytes) {
  const shown = shownUrl(opened.url);
  if (opened.kind === 'file') {
    const size = opened.size != null ? ` (${formatBytes(opened.size)})` : '';
    return `${opened.inputs[0].path}${size} from ${shown}`;
  }
  const { inputs } = opened;
  const tops = new Set(inputs.map((f) => (f.path.includes('/') ? f.path.split('/')[0] : '')));
  const where = tops.size === 1 && !tops.has('') ? ` in ${[...tops][0]}/` : '';
  return `${inputs.length} file${inputs.length === 1 ? '' : 's'}${where} from the manifest ${shown}`;
}
