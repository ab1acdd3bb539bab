// The URL reader of `npx ckptconv` (cli.js): a worker thread that opens URLs and reads their ranges (range.js)
// while the CLI's thread sleeps on the answer (bridge.js). Messages: {type: 'open', url} answered with the JSON
// {handle, size}; {type: 'read', src: handle, offset, len} answered with the bytes. Errors name no URL: the CLI's
// message names it.
import { parentPort } from 'node:worker_threads';
import { answer } from './bridge.js';
import { UrlFile } from '../web/www/range.js';

const files = [];
const detail = (e) => {
  throw new Error(e?.detail ?? e?.message ?? String(e));
};

parentPort.on('message', (msg) =>
  answer(msg, async ({ type, url, src, offset, len }) => {
    if (type === 'open') {
      const f = await UrlFile.open(url).catch(detail);
      files.push(f);
      return new TextEncoder().encode(JSON.stringify({ handle: files.length - 1, size: f.size }));
    }
    return files[src].read(offset, len).catch(detail);
  }),
);
