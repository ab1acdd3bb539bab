// The .zip download's worker: the CRC-32 of each Blob it is sent, read in pieces off the page's thread, with the
// bytes done so far posted as it goes. Started per archive by crcsInWorker (zipdownload.js) and terminated after.
import { crc32OfBlob } from './zipdownload.js';

const PROGRESS_EVERY_MS = 100;

self.onmessage = async ({ data }) => {
  try {
    const crcs = [];
    let done = 0;
    let shown = 0;
    for (const blob of data.blobs) {
      crcs.push(
        await crc32OfBlob(blob, {
          onBytes(n) {
            done += n;
            if (performance.now() - shown >= PROGRESS_EVERY_MS) {
              shown = performance.now();
              postMessage({ type: 'progress', done });
            }
          },
        }),
      );
    }
    postMessage({ type: 'progress', done });
    postMessage({ type: 'crcs', crcs });
  } catch (e) {
    postMessage({ type: 'error', message: e instanceof Error ? e.message : String(e) });
  }
};
