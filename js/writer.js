// The output writer of `npx ckptconv`'s copies (fetcher.js): writes each piece it is sent at its place in its file
// and sends the memory back, so that receiving the next bytes and writing these overlap on two cores (the native
// binary's writer thread does the same). Message: {buffer, offset, len, fd, position} (buffer transferred); answer:
// {buffer, len, errno} (errno 0, or the failed write's Linux errno).
import { writeSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';

parentPort.on('message', ({ buffer, offset, len, fd, position }) => {
  let errno = 0;
  try {
    for (let done = 0; done < len; ) {
      const n = writeSync(fd, new Uint8Array(buffer, offset + done, len - done), 0, len - done, position + done);
      if (n <= 0) throw new Error('the write made no progress');
      done += n;
    }
  } catch (e) {
    errno = Number.isInteger(e?.errno) && e.errno < 0 ? -e.errno : 5;
  }
  parentPort.postMessage({ buffer, len, errno }, [buffer]);
});
