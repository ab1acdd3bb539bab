// Unit tests of the page's URL inputs (web/www/urlinput.js) in Node: manifest validation entry by entry, a file
// URL's name, and openUrl against the real range server (rangeserver.mjs): a file, a .json manifest, the manifest
// endpoint (JSON by Content-Type), relative urls, and the server's failure modes.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { formatBytes } from '../www/format.js';
import {
  MAX_MANIFEST_ENTRIES,
  describeUrlInput,
  fileNameOfUrl,
  httpUrl,
  isJsonType,
  manifestInputs,
  openUrl,
} from '../www/urlinput.js';
import { MANIFEST_PREFIX, serveFiles } from './rangeserver.mjs';

const M = 'https://hub.example/org/model/files.json?sig=secret';
const SHOWN = 'https://hub.example/org/model/files.json';

describe('manifestInputs', () => {
  test('resolves relative urls against the manifest and keeps absolute ones', () => {
    const list = [
      { path: 'actor/a.pt', url: 'actor/a.pt' },
      { path: 'actor/e.pt', url: 'http://localhost:8000/e.pt' },
      { path: 'actor/b c.pt', url: '../other/b%20c.pt?x=1' },
      { path: 'actor/c.pt', url: 'http://127.0.0.1:9/c.pt' },
      { path: 'actor/d.pt', url: '/root/d.pt' },
    ];
    assert.deepEqual(manifestInputs(list, M), [
      { path: 'actor/a.pt', url: 'https://hub.example/org/model/actor/a.pt' },
      { path: 'actor/e.pt', url: 'http://localhost:8000/e.pt' },
      { path: 'actor/b c.pt', url: 'https://hub.example/org/other/b%20c.pt?x=1' },
      { path: 'actor/c.pt', url: 'http://127.0.0.1:9/c.pt' },
      { path: 'actor/d.pt', url: 'https://hub.example/root/d.pt' },
    ]);
  });

  test('extra fields are ignored; non-ASCII paths pass', () => {
    const list = [{ path: '模型/权重.pt', url: 'x', size: 3, type: 'file' }];
    assert.deepEqual(manifestInputs(list, M), [{ path: '模型/权重.pt', url: 'https://hub.example/org/model/x' }]);
  });

  // Each refusal names the manifest (without its query: signed URLs carry secrets there) and says why.
  const refusals = [
    ['not an array', { path: 'a', url: 'a' }, /expected a JSON array/],
    ['null', null, /expected a JSON array/],
    ['empty', [], /lists no files/],
    ['an entry that is no object', ['a.pt'], /entry 0 is not a \{"path", "url"\} object/],
    ['an entry that is an array', [['a.pt', 'a.pt']], /entry 0 is not/],
    ['a missing path', [{ url: 'a' }], /entry 0 has no path/],
    ['an empty path', [{ path: '', url: 'a' }], /entry 0 has no path/],
    ['a numeric path', [{ path: 7, url: 'a' }], /entry 0 has no path/],
    ['a .. segment', [{ path: 'a/../../etc/passwd', url: 'a' }], /entry 0 has a path with a \.\. segment/],
    ['a bare ..', [{ path: '..', url: 'a' }], /a \.\. segment/],
    ['an absolute path', [{ path: '/etc/passwd', url: 'a' }], /an absolute path/],
    ['a drive letter', [{ path: 'C:/x.pt', url: 'a' }], /an absolute path/],
    ['a backslash', [{ path: 'a\\..\\b', url: 'a' }], /a backslash/],
    ['an empty segment', [{ path: 'a//b', url: 'a' }], /an empty or \. segment/],
    ['a trailing slash', [{ path: 'a/', url: 'a' }], /an empty or \. segment/],
    ['a . segment', [{ path: './a', url: 'a' }], /an empty or \. segment/],
    ['a NUL', [{ path: 'a\0b', url: 'a' }], /control characters/],
    ['a duplicate', [{ path: 'a', url: 'a' }, { path: 'a', url: 'b' }], /entry 1: 'a' is listed twice/],
    ['a missing url', [{ path: 'a' }], /entry 0 \('a'\) has no url/],
    ['an empty url', [{ path: 'a', url: '' }], /has no url/],
    ['a non-string url', [{ path: 'a', url: { href: 'x' } }], /has no url/],
    ['a file: url', [{ path: 'a', url: 'file:///etc/passwd' }], /has a file: url; only http\(s\)/],
    ['a javascript: url', [{ path: 'a', url: 'javascript:alert(1)' }], /has a javascript: url/],
    ['a data: url', [{ path: 'a', url: 'data:,x' }], /has a data: url/],
    ['a bad url', [{ path: 'a', url: 'http://[::1' }], /has a url that is not one/],
    // The page's CSP would block it: plain http crosses the network only to this machine.
    [
      'a plain http url off this machine',
      [{ path: 'a', url: 'http://cdn.example/a?sig=s' }],
      /entry 0 \('a'\) has the url http:\/\/cdn\.example\/a: plain http:\/\/ is read only from this machine/,
    ],
  ];
  for (const [label, list, why] of refusals) {
    test(`refuses ${label}`, () => {
      assert.throws(
        () => manifestInputs(list, M),
        (e) => {
          assert.ok(e.message.startsWith(`${SHOWN}: not a folder manifest: `), e.message);
          assert.ok(!e.message.includes('secret'), e.message);
          assert.match(e.message, why);
          return true;
        },
      );
    });
  }

  test('refuses more than MAX_MANIFEST_ENTRIES entries', () => {
    const list = Array.from({ length: MAX_MANIFEST_ENTRIES + 1 }, (_, i) => ({ path: `f${i}`, url: `f${i}` }));
    assert.throws(() => manifestInputs(list, M), /lists 100001 files, more than 100000/);
  });
});

test('httpUrl takes http(s) URLs only, with a clear message otherwise', () => {
  assert.equal(httpUrl('  https://a.example/x.pt ').href, 'https://a.example/x.pt');
  assert.throws(() => httpUrl('a.example/x.pt'), /'a\.example\/x\.pt' is not a URL/);
  assert.throws(() => httpUrl(''), /is not a URL/);
  assert.throws(() => httpUrl('file:///x.pt'), /file: URLs cannot be read/);
  assert.throws(() => httpUrl('ftp://a/x.pt'), /ftp: URLs cannot be read/);
});

test("fileNameOfUrl: the last segment, decoded unless that would make a folder path; '/' at the end names none", () => {
  assert.equal(fileNameOfUrl('https://h/a/b/model.pt?download=1#x'), 'model.pt');
  assert.equal(fileNameOfUrl('https://h/a/%E6%A8%A1%E5%9E%8B%201.pt'), '模型 1.pt');
  assert.equal(fileNameOfUrl('https://h/a/x%2F..%2Fy.pt'), 'x%2F..%2Fy.pt');
  assert.equal(fileNameOfUrl('https://h/a/bad%ZZ.pt'), 'bad%ZZ.pt');
  assert.equal(fileNameOfUrl('https://h/a/%C3.pt'), '%C3.pt');
  assert.throws(() => fileNameOfUrl('https://h/a/?sig=1'), /^Error: https:\/\/h\/a\/: the URL names no file/);
});

test('isJsonType', () => {
  for (const t of ['application/json', 'Application/JSON; charset=utf-8', 'application/vnd.api+json'])
    assert.ok(isJsonType(t), t);
  for (const t of [null, '', 'application/octet-stream', 'text/json', 'application/jsonx', 'application/json-seq'])
    assert.ok(!isJsonType(t), t);
});

test('describeUrlInput names the URL without its query', () => {
  const file = { kind: 'file', url: 'https://h/a/m.pt?sig=s', size: 1_200_000, inputs: [{ path: 'm.pt' }] };
  assert.equal(describeUrlInput(file, formatBytes), 'm.pt (1.20 MB) from https://h/a/m.pt');
  assert.equal(describeUrlInput({ ...file, size: null }, formatBytes), 'm.pt from https://h/a/m.pt');
  const inputs = [{ path: 'actor/a' }, { path: 'actor/b/c' }];
  assert.equal(
    describeUrlInput({ kind: 'manifest', url: M, inputs }, formatBytes),
    `2 files in actor/ from the manifest ${SHOWN}`,
  );
  assert.equal(
    describeUrlInput({ kind: 'manifest', url: M, inputs: [{ path: 'a' }] }, formatBytes),
    `1 file from the manifest ${SHOWN}`,
  );
});

describe('openUrl against the range server', () => {
  let dir, s;
  const DATA = Buffer.alloc(5000, 7);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'urlinput-'));
    await mkdir(join(dir, 'ckpt/sub'), { recursive: true });
    await writeFile(join(dir, 'ckpt/model.pt'), DATA);
    await writeFile(join(dir, 'ckpt/sub/shard.bin'), 'shard');
    // A static manifest beside the files, with urls relative to it.
    const list = [
      { path: 'ckpt/model.pt', url: 'ckpt/model.pt' },
      { path: 'ckpt/sub/shard.bin', url: 'ckpt/sub/shard.bin' },
    ];
    await writeFile(join(dir, 'files.json'), JSON.stringify(list));
    await writeFile(join(dir, 'notalist.json'), '{"path": "a", "url": "a"}');
    await writeFile(join(dir, 'broken.json'), '[{"path": "a"');
    await writeFile(join(dir, 'climbs.json'), JSON.stringify([{ path: '../x', url: 'x' }]));
    s = await serveFiles(dir);
  });

  after(async () => {
    await s?.close();
    await rm(dir, { recursive: true, force: true });
  });

  beforeEach(() => {
    s.mode = 'normal';
    s.reset();
  });

  test('a file: named by its last segment, its size from Content-Range, one byte fetched', async () => {
    const url = `${s.urlOf('ckpt/model.pt')}?token=1`;
    const opened = await openUrl(url);
    assert.deepEqual(opened, { kind: 'file', url, size: DATA.length, inputs: [{ path: 'model.pt', url }] });
    assert.equal(s.bytesSent(), 1);
  });

  test('a .json manifest: fetched whole, relative urls resolved against it', async () => {
    const opened = await openUrl(s.urlOf('files.json'));
    assert.equal(opened.kind, 'manifest');
    assert.deepEqual(opened.inputs, [
      { path: 'ckpt/model.pt', url: s.urlOf('ckpt/model.pt') },
      { path: 'ckpt/sub/shard.bin', url: s.urlOf('ckpt/sub/shard.bin') },
    ]);
    assert.deepEqual(
      s.log.map((e) => [e.path, e.range]),
      [['files.json', null]],
    );
  });

  test('the manifest endpoint (no .json suffix) is a manifest by its Content-Type', async () => {
    const url = `${s.url}${MANIFEST_PREFIX}/ckpt`;
    const opened = await openUrl(url, { manifestOnly: true });
    assert.equal(opened.kind, 'manifest');
    assert.deepEqual(opened.inputs, s.manifest('ckpt'));
    // The probe's answer was the whole listing: no second request.
    assert.equal(s.log.length, 1);
  });

  test('bad manifests are refused naming the manifest URL', async () => {
    await assert.rejects(openUrl(s.urlOf('notalist.json')), {
      message: `${s.urlOf('notalist.json')}: not a folder manifest: expected a JSON array of {"path", "url"} objects`,
    });
    await assert.rejects(
      openUrl(s.urlOf('broken.json')),
      new RegExp(`^Error: ${s.urlOf('broken.json')}: not a folder manifest: not valid JSON`),
    );
    await assert.rejects(
      openUrl(s.urlOf('climbs.json')),
      /climbs\.json: not a folder manifest: entry 0 has a path with a \.\. segment/,
    );
  });

  test('a base must be a manifest', async () => {
    await assert.rejects(
      openUrl(s.urlOf('ckpt/model.pt'), { manifestOnly: true }),
      /model\.pt: not a folder manifest \(a URL ending in \.json, or answered as application\/json\); a base model/,
    );
  });

  test('a missing file or manifest: the status, naming the URL', async () => {
    await assert.rejects(openUrl(s.urlOf('nope.pt')), {
      message: `${s.urlOf('nope.pt')}: the server answered 404 (not found)`,
    });
    await assert.rejects(openUrl(s.urlOf('nope.json')), /nope\.json: the server answered 404/);
    await assert.rejects(openUrl(`${s.url}${MANIFEST_PREFIX}/nope`), /__manifest__\/nope: the server answered 404/);
  });

  test('a server that ignores Range: still a file (the engine says what is wrong), its body not read', async () => {
    s.mode = 'ignore-range';
    const url = s.urlOf('ckpt/model.pt');
    const opened = await openUrl(url);
    assert.deepEqual(opened, { kind: 'file', url, size: DATA.length, inputs: [{ path: 'model.pt', url }] });
    // The server may have pushed some of the body before the cancel reached it, but not necessarily all of it.
    assert.ok(s.bytesSent() <= DATA.length);
  });

  test('dropped connections and 503s are retried', async () => {
    s.mode = 'drop';
    assert.equal((await openUrl(s.urlOf('ckpt/model.pt'))).kind, 'file');
    s.mode = 'flaky-5xx';
    assert.equal((await openUrl(s.urlOf('ckpt/model.pt'))).kind, 'file');
    assert.equal((await openUrl(s.urlOf('files.json'))).inputs.length, 2);
    assert.ok(s.log.some((e) => e.status === 503));
  });

  test('a URL the page may not read (plain http off this machine) is refused before any request', async () => {
    let asked = 0;
    const fetch = () => (asked++, Promise.reject(new Error('no')));
    await assert.rejects(openUrl('http://cdn.example/m.pt?sig=s', { fetch }), {
      message:
        'http://cdn.example/m.pt: plain http:// is read only from this machine (localhost, 127.0.0.1): ' +
        'give an https:// address',
    });
    assert.equal(asked, 0);
  });

  test('an unreachable server: a network error naming the URL, after bounded tries', async () => {
    const url = s.urlOf('ckpt/model.pt').replace(String(s.port), '9');
    await assert.rejects(openUrl(url), (e) => {
      assert.ok(e.message.startsWith('http://127.0.0.1:9/ckpt/model.pt: could not fetch it ('), e.message);
      assert.ok(e.message.endsWith('(after 5 tries)'), e.message);
      return true;
    });
  });
});
