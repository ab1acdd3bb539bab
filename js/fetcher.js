// The URL reader of `npx ckptconv` (cli.js): a worker thread that opens URLs and reads their ranges (range.js)
// while the CLI's thread sleeps on the answer (bridge.js). Messages: {type: 'open', url} answered with the JSON
// {handle, size}; {type: 'read', src: handle, offset, len} answered with the bytes; {type: 'hint', src, offset, len,
// piece} (no answer) starts fetching a range that pieces of `piece` bytes will read next. Errors name no URL: the
// CLI's message names it.
import { parentPort } from 'node:worker_threads';
import { answer } from './bridge.js';
import { UrlFile } from '../web/www/range.js';
import { nodeFetch } from './nodefetch.js';

const files = [];
const detail = (e) => {
  throw new Error(e?.detail ?? e?.message ?? String(e));
};

parentPort.on('message', (msg) => {
  // A hint asks for no answer: the range is fetched ahead for the reads that follow it.
  if (msg.type === 'hint') return files[msg.src]?.hint(msg.offset, msg.len, msg.piece);
  let used = null;
  return answer(msg, async ({ type, url, src, offset, len }) => {
    if (type === 'open') {
      const f = await UrlFile.open(url, { fetch: nodeFetch }).catch(detail);
      files.push(f);
      return new TextEncoder().encode(JSON.stringify({ handle: files.length - 1, size: f.size }));
    }
    used = await files[src].read(offset, len).catch(detail);
    return used;
  }).then(() => used && files[msg.src].recycle(used)); // copied into the shared buffer by now
});
