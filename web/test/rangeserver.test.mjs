// Tests of the range-read test server (web/test/rangeserver.mjs) itself, with Node's fetch and raw node:http on
// small generated files in a temp folder: ranges and 416s, HEAD, CORS, names, path escapes, every failure mode,
// byte counting, backpressure, manifests, close() and the command line.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { MODES, serveFiles } from './rangeserver.mjs';

const SCRIPT = fileURLToPath(new URL('./rangeserver.mjs', import.meta.url));
const SIZE = 10000;
const DATA = Buffer.from(Array.from({ length: SIZE }, (_, i) => (i * 7 + 3) & 255));
const OTHER = Buffer.from(Array.from({ length: 1234 }, (_, i) => (i * 13) & 255));
const WEIRD = 'dir with space/模型 #1 50%?+.bin';
const MEGATRON = [
  'actor/iter_0000001/mp_rank_00/model_optim_rng.pt',
  'actor/iter_0000001/mp_rank_01/model_optim_rng.pt',
  'actor/latest_checkpointed_iteration.txt',
];

let base; // temp folder: root/ is served, secret.txt sits next to it
let root;
let s;

before(async () => {
  base = await mkdtemp(join(tmpdir(), 'rangeserver-'));
  root = join(base, 'root');
  const files = {
    'data.bin': DATA,
    'other.bin': OTHER,
    'empty.bin': Buffer.alloc(0),
    'meta.json': Buffer.from('{"a":1}'),
    [WEIRD]: Buffer.from('weird'),
  };
  MEGATRON.forEach((path, i) => (files[path] = Buffer.from(`file ${i}`)));
  for (const [path, bytes] of Object.entries(files)) {
    await mkdir(join(root, path, '..'), { recursive: true });
    await writeFile(join(root, path), bytes);
  }
  await writeFile(join(base, 'secret.txt'), 'secret');
  s = await serveFiles(root);
});

after(async () => {
  await s?.close();
  await rm(base, { recursive: true, force: true });
});

beforeEach(() => {
  s.mode = 'normal';
  s.reset();
});

const get = (path, range, init = {}) =>
  fetch(s.urlOf(path), { ...init, headers: { ...(range && { range }), ...init.headers } });
const bytes = async (res) => Buffer.from(await res.arrayBuffer());

/** A request with node:http, whose path is sent as is (fetch would normalize ../ away). */
function raw(server, path, { method = 'GET', headers = {} } = {}) {
  return new Promise((ok, err) => {
    const req = request(server.url, { path, method, headers, agent: false }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => ok({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', err);
    });
    req.on('error', err);
    req.end();
  });
}

/** Rejects if `promise` takes longer than `ms`. */
function within(ms, promise, what) {
  let timer;
  const late = new Promise((_, err) => (timer = setTimeout(() => err(new Error(`${what} took over ${ms} ms`)), ms)));
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

describe('normal mode', () => {
  test('byte ranges a-b, a- and -n get 206 with Content-Range, Content-Length and the right bytes', async () => {
    const cases = [
      ['bytes=0-99', 0, 99],
      ['bytes=9990-', 9990, SIZE - 1],
      ['bytes=-10', SIZE - 10, SIZE - 1],
      ['bytes=5000-5000', 5000, 5000],
      ['bytes=9000-20000', 9000, SIZE - 1], // the end is clamped
      ['bytes=-20000', 0, SIZE - 1], // a suffix longer than the file is all of it
      [' Bytes = 10 - 19 ', 10, 19],
    ];
    for (const [range, start, end] of cases) {
      const res = await get('data.bin', range);
      assert.equal(res.status, 206, range);
      assert.equal(res.headers.get('content-range'), `bytes ${start}-${end}/${SIZE}`, range);
      assert.equal(res.headers.get('content-length'), String(end - start + 1), range);
      assert.equal(res.headers.get('accept-ranges'), 'bytes');
      assert.equal(res.headers.get('content-type'), 'application/octet-stream');
      assert.equal(res.headers.get('cache-control'), 'no-store');
      assert.deepEqual(await bytes(res), DATA.subarray(start, end + 1), range);
    }
  });

  test('no Range gets 200 and the whole file; .json is application/json; other Range units are ignored', async () => {
    const res = await get('data.bin');
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-length'), String(SIZE));
    assert.equal(res.headers.get('content-range'), null);
    assert.match(res.headers.get('etag'), /^"[0-9a-f]+-[0-9a-f]+"$/);
    assert.deepEqual(await bytes(res), DATA);
    const json = await get('meta.json');
    assert.equal(json.headers.get('content-type'), 'application/json');
    assert.deepEqual(await json.json(), { a: 1 });
    const items = await get('data.bin', 'items=0-1');
    assert.equal(items.status, 200);
    assert.equal((await bytes(items)).length, SIZE);
  });

  test('unsatisfiable, invalid and multi-range requests get 416 with Content-Range bytes */total', async () => {
    const bad = ['bytes=10000-', 'bytes=20000-20001', 'bytes=-0', 'bytes=5-2', 'bytes=x-y', 'bytes=-', 'junk'];
    for (const range of bad) {
      const res = await get('data.bin', range);
      assert.equal(res.status, 416, range);
      assert.equal(res.headers.get('content-range'), `bytes */${SIZE}`, range);
      assert.equal(res.headers.get('access-control-allow-origin'), '*');
      assert.equal((await bytes(res)).length, 0);
    }
    const multi = await get('data.bin', 'bytes=0-1,5-6');
    assert.equal(multi.status, 416);
    await multi.arrayBuffer();
    const empty = await get('empty.bin', 'bytes=0-');
    assert.equal(empty.status, 416);
    assert.equal(empty.headers.get('content-range'), 'bytes */0');
    await empty.arrayBuffer();
    const whole = await get('empty.bin');
    assert.equal(whole.status, 200);
    assert.equal((await bytes(whole)).length, 0);
  });

  test('HEAD answers the headers of the GET without a body, and is not counted as a request', async () => {
    const ranged = await get('data.bin', 'bytes=100-199', { method: 'HEAD' });
    assert.equal(ranged.status, 206);
    assert.equal(ranged.headers.get('content-range'), `bytes 100-199/${SIZE}`);
    assert.equal(ranged.headers.get('content-length'), '100');
    assert.equal((await bytes(ranged)).length, 0);
    const whole = await get('data.bin', undefined, { method: 'HEAD' });
    assert.equal(whole.status, 200);
    assert.equal(whole.headers.get('content-length'), String(SIZE));
    assert.equal(s.requests(), 0);
    assert.equal(s.bytesSent(), 0);
    assert.equal((await get('nope.bin', undefined, { method: 'HEAD' })).status, 404);
  });

  test('CORS: every response allows any origin and exposes the range headers; OPTIONS is a preflight', async () => {
    const expose = 'Content-Range, Content-Length, Accept-Ranges, ETag';
    const answers = [
      await get('data.bin', 'bytes=0-1'),
      await get('data.bin'),
      await get('nope.bin'),
      await get('data.bin', 'bytes=99999-'),
      await fetch(new URL('__manifest__/actor', s.url)),
    ];
    for (const res of answers) {
      assert.equal(res.headers.get('access-control-allow-origin'), '*', res.url);
      assert.equal(res.headers.get('access-control-expose-headers'), expose, res.url);
      assert.equal(res.headers.get('cache-control'), 'no-store', res.url);
      await res.arrayBuffer();
    }
    const preflight = await raw(s, '/data.bin', {
      method: 'OPTIONS',
      headers: {
        origin: 'http://127.0.0.1:1',
        'access-control-request-method': 'GET',
        'access-control-request-headers': 'range',
      },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers['access-control-allow-origin'], '*');
    assert.equal(preflight.headers['access-control-allow-methods'], 'GET, HEAD, OPTIONS');
    assert.equal(preflight.headers['access-control-allow-headers'], 'Range');
    assert.equal(preflight.headers['access-control-max-age'], '600');
    assert.equal(preflight.body.length, 0);
    const post = await raw(s, '/data.bin', { method: 'POST' });
    assert.equal(post.status, 405);
    assert.equal(post.headers['access-control-allow-origin'], '*');
  });

  test('urlOf percent-encodes each path segment, and the server decodes it back', async () => {
    const url = s.urlOf(WEIRD);
    assert.equal(url, `${s.url}dir%20with%20space/${encodeURIComponent('模型 #1 50%?+.bin')}`);
    assert.ok(url.includes('%23') && url.includes('%25') && url.includes('%3F') && url.includes('%2B'));
    const res = await fetch(url, { headers: { range: 'bytes=1-3' } });
    assert.equal(res.status, 206);
    assert.equal((await bytes(res)).toString(), 'eir');
    assert.equal(s.requests(WEIRD), 1);
    assert.equal(s.log.at(-1).path, WEIRD);
    const tidy = s.urlOf('/actor//latest_checkpointed_iteration.txt');
    assert.equal(tidy, s.urlOf('actor/latest_checkpointed_iteration.txt'));
    assert.equal((await raw(s, '/%ZZ')).status, 400);
  });

  test('nothing outside the folder is reachable: ../, encoded dots and slashes, absolute paths get 403', async () => {
    const escapes = [
      '/../secret.txt',
      '/actor/../../secret.txt',
      '/%2e%2e/secret.txt',
      '/%2E%2E/secret.txt',
      '/..%2fsecret.txt',
      '/actor/..%2F..%2Fsecret.txt',
      `/${encodeURIComponent(join(base, 'secret.txt'))}`,
      '/%2Fetc%2Fpasswd',
      '/data.bin%00',
      '/__manifest__/..',
      '/__manifest__/%2e%2e',
    ];
    for (const path of escapes) {
      const res = await raw(s, path);
      assert.equal(res.status, 403, path);
      assert.ok(!res.body.includes('secret'), path);
    }
    // fetch normalizes these to paths inside the folder, which do not exist there.
    assert.equal((await fetch(new URL('/%2e%2e/secret.txt', s.url))).status, 404);
    assert.equal((await fetch(new URL('/..%2fsecret.txt', s.url))).status, 403);
    assert.equal((await raw(s, '//etc/passwd')).status, 404); // an absolute-looking path stays inside root
    assert.equal((await raw(s, '/actor')).status, 404); // folders are not files
    assert.throws(() => s.urlOf('../secret.txt'), /leaves the served folder/);
    assert.throws(() => s.manifest('..'), /leaves the served folder/);
  });

  test('a symlink inside the folder is followed, for files too big to copy', async () => {
    await symlink(join(root, 'data.bin'), join(root, 'link.bin'));
    try {
      const res = await get('link.bin', 'bytes=0-9');
      assert.deepEqual(await bytes(res), DATA.subarray(0, 10));
      assert.ok(s.manifest('').some((f) => f.path === 'link.bin'));
    } finally {
      await rm(join(root, 'link.bin'));
    }
  });
});

describe('failure modes', () => {
  test('mode only takes known values', () => {
    assert.deepEqual(MODES, ['normal', 'drop', 'ignore-range', 'flaky-5xx', 'grow']);
    assert.throws(() => (s.mode = 'dorp'), /unknown mode/);
    assert.equal(s.mode, 'normal');
  });

  test('drop: the first fetch of a range fails mid-body after half the bytes, the retry gets it whole', async () => {
    s.mode = 'drop';
    const first = await get('data.bin', 'bytes=1000-1999');
    assert.equal(first.status, 206);
    assert.equal(first.headers.get('content-length'), '1000');
    // Read what arrives before the connection dies: exactly the first half.
    const reader = first.body.getReader();
    const got = [];
    await assert.rejects(async () => {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        got.push(value);
      }
    });
    assert.deepEqual(Buffer.concat(got), DATA.subarray(1000, 1500));
    assert.equal(s.drops(), 1);
    assert.equal(s.drops('data.bin'), 1);
    assert.equal(s.bytesSent('data.bin'), 500);

    const second = await get('data.bin', 'bytes=1000-1999');
    assert.equal(second.status, 206);
    assert.deepEqual(await bytes(second), DATA.subarray(1000, 2000));
    assert.equal(s.drops(), 1);
    assert.equal(s.bytesSent('data.bin'), 1500);
    assert.equal(s.requests('data.bin'), 2);
    assert.deepEqual(
      s.log.map((e) => [e.range, e.status, e.dropped ?? false]),
      [
        ['bytes=1000-1999', 206, true],
        ['bytes=1000-1999', 206, false],
      ],
    );

    // Another range is dropped once too, even a single byte (headers only, then the connection dies).
    await assert.rejects((await get('data.bin', 'bytes=-1')).arrayBuffer());
    assert.deepEqual(await bytes(await get('data.bin', 'bytes=-1')), DATA.subarray(SIZE - 1));
    // Whole-file GETs and HEADs are never dropped.
    assert.deepEqual(await bytes(await get('data.bin')), DATA);
    assert.equal((await get('other.bin', 'bytes=0-9', { method: 'HEAD' })).status, 206);
    assert.equal(s.drops(), 2);
    s.reset();
    await assert.rejects((await get('data.bin', 'bytes=1000-1999')).arrayBuffer(), 'reset() forgets drops');
  });

  test('drop with dropTimes: 2 fails a range twice before answering it', async () => {
    const s2 = await serveFiles(root, { mode: 'drop', dropTimes: 2 });
    try {
      const fetchRange = () => fetch(s2.urlOf('other.bin'), { headers: { range: 'bytes=10-209' } });
      await assert.rejects((await fetchRange()).arrayBuffer());
      await assert.rejects((await fetchRange()).arrayBuffer());
      assert.deepEqual(await bytes(await fetchRange()), OTHER.subarray(10, 210));
      assert.equal(s2.drops(), 2);
      assert.equal(s2.bytesSent(), 100 + 100 + 200);
    } finally {
      await s2.close();
    }
  });

  test('ignore-range: every GET gets 200 and the whole file, Range or not', async () => {
    s.mode = 'ignore-range';
    const res = await get('data.bin', 'bytes=0-99');
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-range'), null);
    assert.equal(res.headers.get('content-length'), String(SIZE));
    assert.deepEqual(await bytes(res), DATA);
    assert.equal((await get('data.bin', 'bytes=99999-', { method: 'HEAD' })).status, 200);
    assert.equal(s.bytesSent('data.bin'), SIZE);
  });

  test('onRequest sees each file request before its mode is read: a mode set there applies to that request', async () => {
    const seen = [];
    s.onRequest = (req) => {
      seen.push(req);
      if (req.range === 'bytes=10-19') s.mode = 'ignore-range';
    };
    try {
      assert.equal((await get('data.bin', 'bytes=0-9')).status, 206);
      assert.equal((await get('data.bin', 'bytes=10-19')).status, 200);
      assert.equal((await get('missing.bin', 'bytes=0-9')).status, 404);
    } finally {
      s.onRequest = null;
    }
    assert.deepEqual(seen, [
      { method: 'GET', path: 'data.bin', range: 'bytes=0-9' },
      { method: 'GET', path: 'data.bin', range: 'bytes=10-19' },
    ]);
  });

  test('delayMs holds each file request back; maxInFlight counts the most answered at once', async () => {
    s.delayMs = 50;
    try {
      const one = await get('data.bin', 'bytes=0-9');
      assert.equal(one.status, 206);
      await bytes(one);
      assert.equal(s.maxInFlight(), 1);
      const four = await Promise.all([0, 1, 2, 3].map((i) => get('data.bin', `bytes=${i}-${i}`)));
      assert.deepEqual(await Promise.all(four.map(async (r) => [...(await bytes(r))])), [[3], [10], [17], [24]]);
      assert.equal(s.maxInFlight(), 4);
    } finally {
      s.delayMs = 0;
    }
  });

  test('flaky-5xx: the first request for each (method, file, range) gets 503, the next is answered', async () => {
    s.mode = 'flaky-5xx';
    const first = await get('data.bin', 'bytes=0-9');
    assert.equal(first.status, 503);
    assert.equal(first.headers.get('access-control-allow-origin'), '*');
    assert.equal(first.headers.get('retry-after'), '0');
    await first.arrayBuffer();
    const second = await get('data.bin', 'bytes=0-9');
    assert.equal(second.status, 206);
    assert.deepEqual(await bytes(second), DATA.subarray(0, 10));
    assert.equal((await get('data.bin', 'bytes=10-19', { method: 'HEAD' })).status, 503);
    assert.equal((await get('data.bin', 'bytes=10-19', { method: 'HEAD' })).status, 206);
    const whole = [await get('data.bin'), await get('data.bin')];
    assert.deepEqual(
      whole.map((r) => r.status),
      [503, 200],
    );
    await Promise.all(whole.map((r) => r.arrayBuffer()));
    assert.equal((await get('nope.bin')).status, 404);
    assert.equal(s.requests('data.bin'), 4);
    assert.equal(s.bytesSent(), 10 + SIZE);
    assert.deepEqual(
      s.log.map((e) => e.status),
      [503, 206, 503, 206, 503, 200, 404],
    );
  });

  test('grow: after the first request for a file, it reports one more byte, a trailing zero', async () => {
    s.mode = 'grow';
    const first = await get('data.bin', 'bytes=0-9');
    assert.equal(first.headers.get('content-range'), `bytes 0-9/${SIZE}`);
    const firstTag = first.headers.get('etag');
    await first.arrayBuffer();
    const tail = await get('data.bin', 'bytes=9995-');
    assert.equal(tail.status, 206);
    assert.equal(tail.headers.get('content-range'), `bytes 9995-${SIZE}/${SIZE + 1}`);
    assert.notEqual(tail.headers.get('etag'), firstTag);
    assert.deepEqual(await bytes(tail), Buffer.concat([DATA.subarray(9995), Buffer.of(0)]));
    const last = await get('data.bin', `bytes=${SIZE}-${SIZE}`);
    assert.equal(last.status, 206);
    assert.deepEqual(await bytes(last), Buffer.of(0));
    const whole = await get('data.bin');
    assert.equal(whole.headers.get('content-length'), String(SIZE + 1));
    assert.deepEqual(await bytes(whole), Buffer.concat([DATA, Buffer.of(0)]));
    // It grows once, and per file: another file's first request sees it as it is.
    const head = await get('data.bin', undefined, { method: 'HEAD' });
    assert.equal(head.headers.get('content-length'), String(SIZE + 1));
    const other = await get('other.bin', 'bytes=-1', { method: 'HEAD' });
    assert.equal(other.headers.get('content-range'), `bytes 1233-1233/1234`);
    assert.equal(s.bytesSent('data.bin'), 10 + 6 + 1 + SIZE + 1);
    // Back in normal mode the real size is served again.
    s.mode = 'normal';
    const real = await get('data.bin', 'bytes=-1', { method: 'HEAD' });
    assert.equal(real.headers.get('content-range'), `bytes 9999-9999/${SIZE}`);
  });
});

describe('counting', () => {
  test('bytesSent counts exactly the body bytes sent, per file and in all; requests counts GETs', async () => {
    await bytes(await get('data.bin', 'bytes=0-99'));
    await bytes(await get('data.bin', 'bytes=1000-1499'));
    assert.equal(s.bytesSent('data.bin'), 600);
    assert.equal(s.requests('data.bin'), 2);
    await bytes(await get('other.bin'));
    await get('data.bin', 'bytes=0-99', { method: 'HEAD' });
    await bytes(await get('data.bin', 'bytes=99999-'));
    assert.equal(s.bytesSent('other.bin'), OTHER.length);
    assert.equal(s.bytesSent(), 600 + OTHER.length);
    assert.equal(s.bytesSent('/data.bin'), 600); // the same key, however it is spelled
    assert.equal(s.requests(), 4);
    assert.equal(s.bytesSent('nope.bin'), 0);
    assert.deepEqual(
      s.log.map(({ method, path, range, status }) => [method, path, range, status]),
      [
        ['GET', 'data.bin', 'bytes=0-99', 206],
        ['GET', 'data.bin', 'bytes=1000-1499', 206],
        ['GET', 'other.bin', null, 200],
        ['HEAD', 'data.bin', 'bytes=0-99', 206],
        ['GET', 'data.bin', 'bytes=99999-', 416],
      ],
    );
    const log = s.log;
    s.reset();
    assert.equal(s.bytesSent(), 0);
    assert.equal(s.requests(), 0);
    assert.equal(s.log, log);
    assert.equal(log.length, 0);
  });

  test('the log keeps only the latest logLimit entries', async () => {
    const s2 = await serveFiles(root, { logLimit: 3 });
    try {
      for (let i = 0; i < 5; i++) {
        await bytes(await fetch(s2.urlOf('data.bin'), { headers: { range: `bytes=${i}-${i}` } }));
      }
      assert.deepEqual(
        s2.log.map((e) => e.range),
        ['bytes=2-2', 'bytes=3-3', 'bytes=4-4'],
      );
      assert.equal(s2.requests(), 5);
    } finally {
      await s2.close();
    }
  });

  test('bodies are streamed with backpressure: a reader that stops holds the server back', async () => {
    const big = join(root, 'sparse.bin');
    const fd = openSync(big, 'w');
    ftruncateSync(fd, 512 << 20); // 512 MiB of zeros, a hole on disk
    closeSync(fd);
    try {
      await new Promise((ok, err) => {
        const req = request(s.urlOf('sparse.bin'), { agent: false }, (res) => {
          assert.equal(res.statusCode, 200);
          res.pause();
          // Unbounded, the server would push hundreds of MiB in a second; bounded, it stops at the socket buffers
          // (however slow the machine: no rate is assumed, only a bound on what was sent).
          setTimeout(() => {
            const sent = s.bytesSent('sparse.bin');
            req.destroy();
            try {
              assert.ok(sent < 32 << 20, `${sent} bytes sent to a reader that read none`);
              ok();
            } catch (e) {
              err(e);
            }
          }, 1000);
        });
        req.on('error', () => {});
        req.end();
      });
      // The server survives the reader going away mid-body.
      assert.deepEqual(await bytes(await get('data.bin', 'bytes=0-3')), DATA.subarray(0, 4));
    } finally {
      await rm(big);
    }
  });
});

describe('manifest', () => {
  test('manifest(folder) lists every file under it, sorted, with the folder name first and working URLs', async () => {
    const list = s.manifest('actor');
    assert.deepEqual(
      list.map((f) => f.path),
      MEGATRON,
    );
    for (const [i, { path, url }] of list.entries()) {
      assert.equal(url, s.urlOf(path));
      assert.equal(await (await fetch(url)).text(), `file ${i}`);
    }
    assert.deepEqual(
      s.manifest('actor/iter_0000001/').map((f) => [f.path, f.url]),
      MEGATRON.slice(0, 2).map((p) => [p.slice('actor/'.length), s.urlOf(p)]),
    );
    const all = s.manifest().map((f) => f.path);
    assert.deepEqual(all, [...all].sort());
    assert.ok(all.includes(WEIRD) && all.includes('data.bin') && all.includes(MEGATRON[0]));
    assert.equal(s.manifest(WEIRD.split('/')[0])[0].url, s.urlOf(WEIRD));
    assert.throws(() => s.manifest('nope'), /no folder/);
    assert.throws(() => s.manifest('data.bin'), /no folder/);
  });

  test('GET /__manifest__/<folder> serves the same list as JSON', async () => {
    const res = await fetch(new URL('__manifest__/actor', s.url));
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'application/json');
    assert.equal(res.headers.get('access-control-allow-origin'), '*');
    assert.deepEqual(await res.json(), s.manifest('actor'));
    const encoded = await fetch(`${s.url}__manifest__/${encodeURIComponent('dir with space')}`);
    assert.deepEqual(await encoded.json(), s.manifest('dir with space'));
    assert.deepEqual(await (await fetch(new URL('__manifest__/', s.url))).json(), s.manifest(''));
    assert.equal((await fetch(new URL('__manifest__/nope', s.url))).status, 404);
    assert.equal(s.requests(), 0);
    assert.equal(s.bytesSent(), 0);
  });
});

describe('lifetime', () => {
  test('close() does not wait for idle keep-alive connections or a response still streaming', async () => {
    const s2 = await serveFiles(root);
    const big = join(root, 'sparse2.bin');
    const fd = openSync(big, 'w');
    ftruncateSync(fd, 256 << 20);
    closeSync(fd);
    try {
      // An idle keep-alive connection in fetch's pool ...
      const res = await fetch(s2.urlOf('data.bin'));
      assert.equal(res.headers.get('connection'), 'keep-alive');
      await res.arrayBuffer();
      // ... and one stuck mid-body behind a reader that does not read.
      await new Promise((ok, err) => {
        const req = request(s2.urlOf('sparse2.bin'), { agent: false }, (r) => {
          r.pause();
          r.on('error', () => {});
          ok();
        });
        req.on('error', err);
        req.end();
      });
      await within(2000, s2.close(), 'close()');
      await assert.rejects(fetch(s2.urlOf('data.bin')));
    } finally {
      await s2.close();
      await rm(big);
    }
  });

  test('node rangeserver.mjs ROOT 0 MODE prints the base URL and serves in that mode until killed', async () => {
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const child = spawn(process.execPath, [SCRIPT, root, '0', 'ignore-range'], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    try {
      const url = await within(
        5000,
        new Promise((ok, err) => {
          let out = '';
          child.stdout.on('data', (d) => {
            out += d;
            if (out.includes('\n')) ok(out.split('\n')[0]);
          });
          child.on('exit', (code) => err(new Error(`exited with ${code}`)));
        }),
        'startup',
      );
      assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
      const res = await fetch(new URL('data.bin', url), { headers: { range: 'bytes=0-9' } });
      assert.equal(res.status, 200);
      assert.deepEqual(await bytes(res), DATA);
    } finally {
      child.kill();
    }
  });
});
