// The "Download all as .zip" archive: a CRC-32 of any Blob read in pieces, and a .zip of STORED entries laid out as
// a Blob whose parts are small header buffers plus the output Files themselves, so the browser streams the entries
// from wherever they live (OPFS Files stay on disk) and no output is ever copied into memory. Names keep their
// folders (UTF-8, flag bit 11); ZIP64 is used where a size or an offset needs it. Pure functions over Blobs (and
// Blob-likes: {size, slice(a, b).arrayBuffer()}), so Node runs the unit tests (web/test/zipdownload.test.mjs);
// the page computes the CRCs in a worker (zipcrc.js) through crcsInWorker().

/** Piece size for reading a Blob: each read costs about the same whatever its size, so read big (../shared/WEB.md). */
export const CRC_PIECE = 16 << 20;

// Slicing-by-8 tables: table k maps a byte to its CRC contribution k bytes further on.
const TABLE = new Int32Array(256 * 8);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  TABLE[n] = c;
}
for (let k = 1; k < 8; k++) {
  for (let n = 0; n < 256; n++) {
    const prev = TABLE[(k - 1) * 256 + n];
    TABLE[k * 256 + n] = (prev >>> 8) ^ TABLE[prev & 0xff];
  }
}
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** The CRC-32 (zip's, zlib's) of `bytes` (a Uint8Array), continuing from `crc` (the CRC of what came before). */
export function crc32(bytes, crc = 0) {
  const T = TABLE;
  const n = bytes.length;
  let c = ~crc;
  let i = 0;
  // Eight bytes a step, read as two aligned 32-bit words (about 1.3 GB/s in V8, against 0.9 byte by byte).
  if (LITTLE_ENDIAN && n >= 16) {
    const head = (4 - (bytes.byteOffset & 3)) & 3;
    for (; i < head; i++) c = T[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    const words = ((n - i) >>> 3) << 1;
    const w = new Int32Array(bytes.buffer, bytes.byteOffset + i, words);
    for (let j = 0; j < words; j += 2) {
      const a = w[j] ^ c;
      const b = w[j + 1];
      c =
        T[1792 + (a & 0xff)] ^
        T[1536 + ((a >>> 8) & 0xff)] ^
        T[1280 + ((a >>> 16) & 0xff)] ^
        T[1024 + (a >>> 24)] ^
        T[768 + (b & 0xff)] ^
        T[512 + ((b >>> 8) & 0xff)] ^
        T[256 + ((b >>> 16) & 0xff)] ^
        T[b >>> 24];
    }
    i += words * 4;
  }
  for (; i < n; i++) c = T[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/**
 * The CRC-32 of a whole Blob; `onBytes(n)` after each piece read. Where the Blob's stream takes a BYOB reader
 * (Chromium, Node) one `piece`-sized buffer is filled again and again, so memory stays flat; elsewhere (or with
 * `slices: true`, or for a Blob-like without stream()) `piece`-sized slices are read, the next one already under
 * way while one is summed. Both read a 2 GiB OPFS File at 450-550 MB/s in Chromium, but slices leave a few hundred
 * MB of garbage behind them.
 */
export async function crc32OfBlob(blob, { piece = CRC_PIECE, onBytes, slices = false } = {}) {
  let reader = null;
  if (!slices && typeof blob.stream === 'function') {
    try {
      reader = blob.stream().getReader({ mode: 'byob' });
    } catch {
      // Not a byte stream here: read slices.
    }
  }
  return reader ? crcOfByteStream(reader, blob.size, piece, onBytes) : crcOfSlices(blob, piece, onBytes);
}

async function crcOfByteStream(reader, size, piece, onBytes) {
  let crc = 0;
  let seen = 0;
  let buffer = new ArrayBuffer(Math.max(1, Math.min(piece, size)));
  try {
    for (;;) {
      const { done, value } = await reader.read(new Uint8Array(buffer));
      if (done) break;
      crc = crc32(value, crc);
      seen += value.length;
      onBytes?.(value.length);
      // The read hands the (transferred) buffer back: fill it again.
      buffer = value.buffer;
    }
  } finally {
    reader.releaseLock();
  }
  if (seen !== size) throw new Error(`read ${seen} bytes of ${size}: the file changed while it was being read`);
  return crc;
}

async function crcOfSlices(blob, piece, onBytes) {
  const size = blob.size;
  const read = (at) => (at < size ? blob.slice(at, Math.min(at + piece, size)).arrayBuffer() : null);
  let crc = 0;
  let next = read(0);
  for (let at = 0; next; ) {
    const bytes = new Uint8Array(await next);
    const want = Math.min(piece, size - at);
    if (bytes.length !== want) throw new Error(`reading bytes ${at}..${at + want} gave ${bytes.length} bytes`);
    at += want;
    next = read(at);
    crc = crc32(bytes, crc);
    onBytes?.(want);
  }
  return crc;
}

const U16 = 0xffff;
const U32 = 0xffffffff;
const UTF8_NAMES = 0x0800; // general purpose flag bit 11: names are UTF-8
const MADE_BY_UNIX = 3 << 8; // so unzip applies the mode in the external attributes
const FILE_MODE = 0o100644; // a regular file, rw-r--r--

/** A zip entry name: relative, '/'-separated, no empty, '.' or '..' part (what an extractor would write outside). */
function checkName(name) {
  const parts = String(name).split('/');
  if (!name || /[\\\0]/.test(name) || parts.some((p) => p === '' || p === '.' || p === '..')) {
    throw new Error(`not a safe name inside a .zip: ${JSON.stringify(name)}`);
  }
}

/** MS-DOS date and time (local time, 2-second steps, 1980..2107) as zip headers store them. */
export function dosDateTime(date) {
  const [first, last] = [new Date(1980, 0, 1), new Date(2107, 11, 31, 23, 59, 58)];
  const d = new Date(Math.min(Math.max(date.getTime(), first.getTime()), last.getTime()));
  return {
    time: (d.getHours() << 11) | (d.getMinutes() << 5) | (d.getSeconds() >>> 1),
    date: ((d.getFullYear() - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate(),
  };
}

/** A little-endian record writer over a fresh buffer of `size` bytes. */
function record(size) {
  const bytes = new Uint8Array(size);
  const view = new DataView(bytes.buffer);
  let at = 0;
  return {
    bytes,
    u16(v) {
      view.setUint16(at, v, true);
      at += 2;
    },
    u32(v) {
      view.setUint32(at, v, true);
      at += 4;
    },
    u64(v) {
      view.setBigUint64(at, BigInt(v), true);
      at += 8;
    },
    raw(b) {
      bytes.set(b, at);
      at += b.length;
    },
    end() {
      if (at !== size) throw new Error(`zip record: wrote ${at} of ${size} bytes`);
      return bytes;
    },
  };
}

/**
 * The parts of a .zip holding `entries` ([{name, blob, crc32}], in order) as STORED files, for `new Blob(parts)`:
 * local header, then the entry's Blob itself (never read here), for each entry; then the central directory and its
 * end records. No data descriptors: sizes and CRCs are known before the first byte.
 *
 * ZIP64 (APPNOTE 4.5.3): an entry of 0xFFFFFFFF bytes or more gets 0xFFFFFFFF sizes and a 0x0001 extra field with
 * both real sizes in its local header and in its central record; an entry whose local header starts at or past
 * 0xFFFFFFFF also gets its offset there (central record only). The ZIP64 end of central directory record and its
 * locator are written when the entry count, the directory's size or its offset do not fit the classic end record,
 * whose fields are then 0xFFFF / 0xFFFFFFFF. `zip64: true` forces all of it for every entry, whatever the sizes, so
 * a test can check the ZIP64 layout with small files. `date` is every entry's modification time.
 */
export function zipParts(entries, { zip64 = false, date = new Date() } = {}) {
  const encoder = new TextEncoder();
  const { time, date: day } = dosDateTime(date);
  const seen = new Set();
  const parts = [];
  const central = [];
  let offset = 0;
  for (const { name, blob, crc32: crc } of entries) {
    checkName(name);
    if (seen.has(name)) throw new Error(`the name ${JSON.stringify(name)} is in the .zip twice`);
    seen.add(name);
    const nameBytes = encoder.encode(name);
    if (nameBytes.length > U16) throw new Error(`a name of ${nameBytes.length} bytes is too long for a .zip`);
    const size = blob.size;
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`${name}: bad size ${size}`);
    if (!Number.isInteger(crc) || crc < 0 || crc > U32) throw new Error(`${name}: bad CRC-32 ${crc}`);
    const bigSize = zip64 || size >= U32;
    const bigOffset = zip64 || offset >= U32;
    const version = bigSize || bigOffset ? 45 : 20;

    const local = record(30 + nameBytes.length + (bigSize ? 20 : 0));
    local.u32(0x04034b50);
    local.u16(version);
    local.u16(UTF8_NAMES);
    local.u16(0); // stored
    local.u16(time);
    local.u16(day);
    local.u32(crc);
    local.u32(bigSize ? U32 : size); // compressed size
    local.u32(bigSize ? U32 : size); // uncompressed size
    local.u16(nameBytes.length);
    local.u16(bigSize ? 20 : 0);
    local.raw(nameBytes);
    if (bigSize) {
      // In a local header the ZIP64 field holds both sizes, uncompressed first.
      local.u16(0x0001);
      local.u16(16);
      local.u64(size);
      local.u64(size);
    }
    parts.push(local.end(), blob);

    // In the central record the ZIP64 field holds only the fields that read 0xFFFFFFFF, in this order.
    const extra = (bigSize ? 16 : 0) + (bigOffset ? 8 : 0);
    const head = record(46 + nameBytes.length + (extra ? 4 + extra : 0));
    head.u32(0x02014b50);
    head.u16(MADE_BY_UNIX | 45);
    head.u16(version);
    head.u16(UTF8_NAMES);
    head.u16(0);
    head.u16(time);
    head.u16(day);
    head.u32(crc);
    head.u32(bigSize ? U32 : size);
    head.u32(bigSize ? U32 : size);
    head.u16(nameBytes.length);
    head.u16(extra ? 4 + extra : 0);
    head.u16(0); // comment length
    head.u16(0); // disk number start
    head.u16(0); // internal attributes
    head.u32((FILE_MODE << 16) >>> 0);
    head.u32(bigOffset ? U32 : offset);
    head.raw(nameBytes);
    if (extra) {
      head.u16(0x0001);
      head.u16(extra);
      if (bigSize) {
        head.u64(size);
        head.u64(size);
      }
      if (bigOffset) head.u64(offset);
    }
    central.push(head.end());
    offset += local.bytes.length + size;
  }

  const cdOffset = offset;
  const cdSize = central.reduce((n, b) => n + b.length, 0);
  parts.push(...central);
  const count = entries.length;
  const big = zip64 || count >= U16 || cdSize >= U32 || cdOffset >= U32;
  if (big) {
    const end64 = record(56);
    end64.u32(0x06064b50);
    end64.u64(56 - 12); // size of the rest of this record
    end64.u16(MADE_BY_UNIX | 45);
    end64.u16(45);
    end64.u32(0); // this disk
    end64.u32(0); // the disk with the central directory
    end64.u64(count); // entries on this disk
    end64.u64(count); // entries in all
    end64.u64(cdSize);
    end64.u64(cdOffset);
    const locator = record(20);
    locator.u32(0x07064b50);
    locator.u32(0); // the disk with the ZIP64 end record
    locator.u64(cdOffset + cdSize); // where that record starts
    locator.u32(1); // disks in all
    parts.push(end64.end(), locator.end());
  }
  const end = record(22);
  end.u32(0x06054b50);
  end.u16(0);
  end.u16(0);
  end.u16(big ? U16 : count);
  end.u16(big ? U16 : count);
  end.u32(big ? U32 : cdSize);
  end.u32(big ? U32 : cdOffset);
  end.u16(0); // comment length
  parts.push(end.end());
  return parts;
}

/** zipParts as one Blob: in Chromium, parts that are disk-backed Files stay on disk inside it. */
export function zipBlob(entries, options) {
  return new Blob(zipParts(entries, options), { type: 'application/zip' });
}

/** The byte size of the archive zipParts would make, without making it. */
export function zipSize(parts) {
  return parts.reduce((n, p) => n + (p.byteLength ?? p.size), 0);
}

/**
 * The name of the folder the outputs of a conversion of `paths` (the inputs' relative paths) would go in:
 * `<input>-hf`, where `<input>` is the folder the inputs share (`actor/…` gives `actor-hf`), or a lone file's
 * name without its extension, or `ckptconv-output`. Characters file systems refuse become `_`.
 */
export function outputFolderName(paths) {
  const tops = new Set(paths.map((p) => (p.includes('/') ? p.split('/')[0] : '')));
  let stem = '';
  if (tops.size === 1 && !tops.has('')) stem = [...tops][0];
  else if (paths.length === 1) stem = paths[0].split('/').pop().replace(/\.[^.]*$/, '');
  stem = stem.replace(/[\u0000-\u001f\u007f<>:"/\\|?*]/g, '_').replace(/^[.\s]+|[.\s]+$/g, '');
  return stem ? `${stem}-hf` : 'ckptconv-output';
}

/**
 * The CRC-32 of each of `blobs`, computed in a worker (zipcrc.js) so gigabytes of outputs do not freeze the page.
 * `onBytes(done)` reports the bytes summed so far, over all blobs. Resolves to the CRCs in order; `abort()` stops
 * the worker and rejects with an AbortError.
 */
export function crcsInWorker(blobs, onBytes) {
  const worker = new Worker(new URL('./zipcrc.js', import.meta.url), { type: 'module' });
  let abort;
  const done = new Promise((resolve, reject) => {
    const stop = (error) => {
      worker.terminate();
      reject(error);
    };
    abort = () => stop(new DOMException('the .zip was cancelled', 'AbortError'));
    worker.onmessage = ({ data }) => {
      if (data.type === 'progress') onBytes?.(data.done);
      else if (data.type === 'crcs') {
        worker.terminate();
        resolve(data.crcs);
      } else stop(new Error(data.message));
    };
    worker.onerror = (e) => stop(new Error(e.message || 'the CRC-32 worker failed'));
  });
  worker.postMessage({ blobs });
  return { done, abort };
}
