// Reading a range of an input in a worker (a Blob with FileReaderSync, or a synchronous reader with read()), shared
// by the page's workers and the npm package's.
let reader;

/** The default piece size when a range is handed on piece by piece. */
export const READ_PIECE = 16 << 20;

/** Bytes `from .. from + len` of `file` (called `name` in messages, as the engine calls it) as a fresh Uint8Array. */
export function readRange(file, name, from, len) {
  let bytes;
  try {
    // A Blob, or one of the npm package's synchronous readers ({size, read(offset, len)}).
    if (typeof file.read === 'function') bytes = file.read(from, len);
    else bytes = new Uint8Array((reader ??= new FileReaderSync()).readAsArrayBuffer(file.slice(from, from + len)));
  } catch (e) {
    throw new Error(`${name}: reading bytes ${from}..${from + len} failed: ${e instanceof Error ? e.message : e}`);
  }
  if (bytes.length !== len) throw new Error(`${name}: the file changed or was cut while it was being read`);
  return bytes;
}

/**
 * The range `from .. from + len` of `file` in pieces of up to `size` bytes, each read when asked for: yields
 * `[bytes, at]`, with `at` counted from `from`.
 */
export function* readPieces(file, name, from, len, size = READ_PIECE) {
  for (let at = 0; at < len; at += size) yield [readRange(file, name, from + at, Math.min(size, len - at)), at];
}
