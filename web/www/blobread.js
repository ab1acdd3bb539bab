// Reading a range of an input Blob in a worker (FileReaderSync), shared by the page's workers and the npm package's.
let reader;

/** Bytes `from .. from + len` of `file` (called `name` in messages, as the engine calls it) as a fresh Uint8Array. */
export function readRange(file, name, from, len) {
  reader ??= new FileReaderSync();
  let bytes;
  try {
    bytes = new Uint8Array(reader.readAsArrayBuffer(file.slice(from, from + len)));
  } catch (e) {
    throw new Error(`${name}: reading bytes ${from}..${from + len} failed: ${e instanceof Error ? e.message : e}`);
  }
  if (bytes.length !== len) throw new Error(`${name}: the file changed or was cut while it was being read`);
  return bytes;
}
