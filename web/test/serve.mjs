// A tiny static file server for the page and the tests: maps URL prefixes to folders, serves them on 127.0.0.1
// with the MIME types browsers insist on (.wasm must be application/wasm for instantiateStreaming, module
// scripts must be JavaScript) and the page's CSP as a header too, so workers run under the same policy.
// `node web/test/serve.mjs [port]` serves the page (web/www at /, web/pkg at /pkg/). Run by `node --test web/test/`
// (which runs every module in a test/ folder), it tests itself instead.
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
};

export const CSP =
  "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; " +
  "connect-src 'self' https: http://localhost:* http://127.0.0.1:*; " +
  "img-src 'self' data:; style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'";

/** Serves `mounts` ({'/': dir, '/pkg/': dir}); resolves to {url, close()}. Port 0 picks a free one. */
export async function serve(mounts, port = 0) {
  // Longest prefix first, so /pkg/ wins over /.
  const table = Object.entries(mounts)
    .map(([prefix, dir]) => [prefix, resolve(dir)])
    .sort((a, b) => b[0].length - a[0].length);
  const server = createServer(async (req, res) => {
    try {
      const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      const mount = table.find(([prefix]) => path.startsWith(prefix));
      if (!mount || (req.method !== 'GET' && req.method !== 'HEAD')) return fail(res, 404);
      const [prefix, root] = mount;
      let file = resolve(join(root, path.slice(prefix.length)));
      // Never leave the mounted folder (../ or an absolute path smuggled in).
      if (file !== root && !file.startsWith(root + sep)) return fail(res, 403);
      let info = await stat(file).catch(() => null);
      if (info?.isDirectory()) {
        file = join(file, 'index.html');
        info = await stat(file).catch(() => null);
      }
      if (!info?.isFile()) return fail(res, 404);
      res.writeHead(200, {
        'content-type': MIME[extname(file)] ?? 'application/octet-stream',
        'content-length': info.size,
        'content-security-policy': CSP,
        'x-content-type-options': 'nosniff',
        'cache-control': 'no-store',
      });
      if (req.method === 'HEAD') return res.end();
      createReadStream(file).pipe(res);
    } catch {
      fail(res, 400);
    }
  });
  await new Promise((ok) => server.listen(port, '127.0.0.1', ok));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    close: () =>
      new Promise((ok) => {
        server.close(ok);
        // Keep-alive sockets would hold close() open for seconds.
        server.closeAllConnections();
      }),
  };
}

function fail(res, code) {
  res.writeHead(code, { 'content-type': 'text/plain' });
  res.end(String(code));
}

const web = fileURLToPath(new URL('..', import.meta.url));
export const PAGE_MOUNTS = { '/': join(web, 'www'), '/pkg/': join(web, 'pkg') };

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.env.NODE_TEST_CONTEXT) await selfTest();
  else console.log(`ckptconv page at ${(await serve(PAGE_MOUNTS, Number(process.argv[2] ?? 8080))).url}`);
}

async function selfTest() {
  const { test } = await import('node:test');
  const assert = await import('node:assert/strict');
  test('the static server sends browser-ready MIME types and the CSP, and stays inside its folders', async () => {
    const s = await serve(PAGE_MOUNTS);
    try {
      const get = (path) => fetch(new URL(path, s.url));
      const page = await get('/');
      assert.equal(page.status, 200);
      assert.match(page.headers.get('content-type'), /^text\/html/);
      assert.equal(page.headers.get('content-security-policy'), CSP);
      // The page's own meta tag says the same, for hosts that send no header.
      assert.ok((await page.text()).includes(`content="${CSP}"`));
      assert.match((await get('/main.js')).headers.get('content-type'), /^text\/javascript/);
      assert.equal((await get('/pkg/ckptconv_web_bg.wasm')).headers.get('content-type'), 'application/wasm');
      assert.equal((await get('/nope.js')).status, 404);
      // fetch normalizes ../ away, so smuggle it encoded.
      assert.notEqual((await get('/pkg/..%2f..%2fCargo.toml')).status, 200);
      assert.notEqual((await get('/%2e%2e/src/lib.rs')).status, 200);
    } finally {
      await s.close();
    }
  });
}
