// Unit tests of the page's .zip builder (web/www/zipdownload.js) in Node: the CRC-32 against zlib's, and archives
// built from Blobs written to disk and read back by Python's zipfile (testzip, names, flags, bytes) and Info-ZIP's
// `unzip -t` / `unzip -d` when installed. ZIP64 is checked twice: forced on small files (every ZIP64 field and end
// record, cheap), and for real with a Blob-like of zeros just over 4 GiB, written as a sparse file (about 15 s:
// the CRC and zipfile's testzip each read all of it).
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, readdirSync, statSync, writeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, test } from 'node:test';
import zlib from 'node:zlib';
import { PYTHON } from './harness.mjs';
import {
  crc32,
  crc32OfBlob,
  dosDateTime,
  outputFolderName,
  zipBlob,
  zipParts,
  zipSize,
} from '../www/zipdownload.js';

const HAVE_UNZIP = spawnSync('unzip', ['-v'], { stdio: 'ignore' }).status === 0;

// Reads a .zip with zipfile: every entry's info, testzip's verdict (it reads and CRC-checks every byte), the
// end records it found, and the sha256 of entries up to 64 MiB.
const READ_ZIP = `
import hashlib, json, struct, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    bad = z.testzip()
    out = {'bad': bad, 'entries': []}
    for i in z.infolist():
        e = {'name': i.filename, 'size': i.file_size, 'csize': i.compress_size, 'crc': i.CRC,
             'method': i.compress_type, 'flags': i.flag_bits, 'offset': i.header_offset,
             'zip64_extra': b'\\x01\\x00' == i.extra[:2], 'version': i.extract_version,
             'mode': i.external_attr >> 16, 'date': list(i.date_time)}
        if i.file_size <= 64 << 20:
            e['sha256'] = hashlib.sha256(z.read(i)).hexdigest()
        out['entries'].append(e)
data = open(path, 'rb')
data.seek(-22, 2)
end = data.read(22)
data.seek(-42, 2)
out['locator'] = data.read(4) == b'PK\\x06\\x07'
out['end_fields'] = list(struct.unpack('<4s4H2LH', end)[3:7])
print(json.dumps(out))
`;

function readZip(path) {
  return JSON.parse(execFileSync(PYTHON, ['-c', READ_ZIP, path], { encoding: 'utf8', maxBuffer: 64 << 20 }));
}

function unzipTest(path) {
  if (!HAVE_UNZIP) return;
  const r = spawnSync('unzip', ['-t', path], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /No errors detected/);
}

/** Writes the parts of zipParts to `path`: bytes as they are, a Blob's bytes, and a ZeroBlob as a hole. */
async function writeParts(path, parts) {
  const fd = openSync(path, 'w');
  try {
    let at = 0;
    for (const part of parts) {
      if (part instanceof Uint8Array) writeSync(fd, part, 0, part.length, at);
      else if (!(part instanceof ZeroBlob)) writeSync(fd, new Uint8Array(await part.arrayBuffer()), 0, part.size, at);
      at += part.byteLength ?? part.size;
    }
    ftruncateSync(fd, at);
  } finally {
    closeSync(fd);
  }
}

/** A Blob-like of `size` zero bytes that holds none of them: what a multi-GiB OPFS File is to the builder. */
class ZeroBlob {
  constructor(size) {
    this.size = size;
  }
  slice(a, b) {
    const n = Math.max(0, Math.min(b, this.size) - a);
    return { size: n, arrayBuffer: async () => new ArrayBuffer(n) };
  }
}

const sha = (bytes) => createHash('sha256').update(bytes).digest('hex');

async function entryOf(name, bytes) {
  const blob = new Blob([bytes]);
  return { name, blob, crc32: await crc32OfBlob(blob, { piece: 1000 }), bytes: Buffer.from(bytes) };
}

let scratch;
before(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'ckptconv-zip-test-'));
});
after(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

describe('CRC-32', () => {
  test('matches the check value and zlib, at every alignment and length, and continues across pieces', () => {
    assert.equal(crc32(new TextEncoder().encode('123456789')), 0xcbf43926);
    assert.equal(crc32(new Uint8Array(0)), 0);
    const buf = new Uint8Array(70_000);
    for (let i = 0; i < buf.length; i++) buf[i] = (i * 2654435761) >>> 13;
    for (const start of [0, 1, 2, 3, 5]) {
      for (const len of [0, 1, 7, 15, 16, 17, 31, 1000, 65_537]) {
        const part = buf.subarray(start, start + len);
        assert.equal(crc32(part), zlib.crc32(part), `start ${start}, length ${len}`);
      }
    }
    assert.equal(crc32(buf.subarray(12_345), crc32(buf.subarray(0, 12_345))), zlib.crc32(buf));
  });

  for (const slices of [false, true]) {
    test(`of a Blob read ${slices ? 'in slices' : 'through a BYOB reader'} equals the CRC of its bytes`, async () => {
      const bytes = new Uint8Array(100_003).map((_, i) => i * 7);
      let reported = 0;
      const crc = await crc32OfBlob(new Blob([bytes]), { piece: 4096, slices, onBytes: (n) => (reported += n) });
      assert.equal(crc, zlib.crc32(bytes));
      assert.equal(reported, bytes.length, 'every byte reported once');
      assert.equal(await crc32OfBlob(new Blob([]), { slices }), 0);
    });
  }

  test('a Blob that comes back short (changed on disk) is an error, read either way', async () => {
    const short = { size: 10, slice: () => ({ arrayBuffer: async () => new ArrayBuffer(3) }) };
    await assert.rejects(crc32OfBlob(short), /reading bytes 0\.\.10 gave 3 bytes/);
    const blob = new Blob(['abc']);
    const shortStream = { size: 10, stream: () => blob.stream() };
    await assert.rejects(crc32OfBlob(shortStream), /read 3 bytes of 10/);
  });
});

describe('the .zip', () => {
  test('STORED entries keep their folders and UTF-8 names; zipfile and unzip read them byte for byte', async () => {
    const entries = [
      await entryOf('config.json', '{"model_type": "qwen2"}\n'),
      await entryOf('model.safetensors', new Uint8Array(300_001).map((_, i) => i % 251)),
      await entryOf('lora_adapter/adapter_config.json', '{"r": 8}'),
      await entryOf('lora_adapter/adapter_model.safetensors', new Uint8Array(4097).fill(9)),
      await entryOf('modèle/权重.json', '[]'),
      await entryOf('empty.txt', ''),
    ];
    const date = new Date(2024, 4, 17, 13, 45, 30);
    const parts = zipParts(entries, { date });
    const path = join(scratch, 'small.zip');
    await writeParts(path, parts);
    assert.equal(statSync(path).size, zipSize(parts));
    // zipBlob makes the same bytes.
    assert.deepEqual(Buffer.from(await zipBlob(entries, { date }).arrayBuffer()), readFileSync(path));
    // Nothing is copied: each entry's own Blob is one of the parts.
    for (const e of entries) assert.ok(parts.includes(e.blob));

    const read = readZip(path);
    assert.equal(read.bad, null);
    assert.equal(read.locator, false, 'no ZIP64 end records when nothing needs them');
    assert.deepEqual(read.end_fields, [entries.length, entries.length, read.end_fields[2], read.end_fields[3]]);
    assert.deepEqual(
      read.entries.map((e) => e.name),
      entries.map((e) => e.name),
    );
    for (const [i, e] of read.entries.entries()) {
      assert.equal(e.sha256, sha(entries[i].bytes), e.name);
      assert.equal(e.size, entries[i].bytes.length);
      assert.equal(e.csize, e.size);
      assert.equal(e.crc, entries[i].crc32);
      assert.equal(e.method, 0, 'stored');
      assert.equal(e.flags, 0x0800, 'UTF-8 names, no data descriptor');
      assert.equal(e.zip64_extra, false);
      assert.equal(e.version, 20);
      assert.equal(e.mode, 0o100644);
      assert.deepEqual(e.date, [2024, 5, 17, 13, 45, 30]);
    }
    unzipTest(path);
    if (HAVE_UNZIP) {
      const out = join(scratch, 'small-out');
      execFileSync('unzip', ['-q', path, '-d', out]);
      const files = {};
      const walk = (d) => {
        for (const n of readdirSync(d)) {
          const p = join(d, n);
          if (statSync(p).isDirectory()) walk(p);
          else files[relative(out, p)] = sha(readFileSync(p));
        }
      };
      walk(out);
      assert.deepEqual(files, Object.fromEntries(entries.map((e) => [e.name, sha(e.bytes)])));
    }
  });

  test('forced ZIP64 (every size and offset in 0x0001 extras, ZIP64 end record and locator) reads back', async () => {
    const entries = [
      await entryOf('a.bin', new Uint8Array(5000).fill(1)),
      await entryOf('sub/b.bin', 'second'),
      await entryOf('empty', ''),
    ];
    const path = join(scratch, 'forced64.zip');
    const parts = zipParts(entries, { zip64: true });
    await writeParts(path, parts);
    const read = readZip(path);
    assert.equal(read.bad, null);
    assert.equal(read.locator, true);
    // The classic end record only points at the ZIP64 one.
    assert.deepEqual(read.end_fields, [0xffff, 0xffff, 0xffffffff, 0xffffffff]);
    let offset = 0;
    for (const [i, e] of read.entries.entries()) {
      assert.equal(e.name, entries[i].name);
      assert.equal(e.sha256, sha(entries[i].bytes));
      assert.equal(e.zip64_extra, true);
      assert.equal(e.version, 45);
      // zipfile took the offset from the extra field: it must be where the local header really is.
      assert.equal(e.offset, offset);
      offset += 30 + Buffer.byteLength(e.name) + 20 + e.size;
    }
    // Each local header carries its 0x0001 field too (the reader above takes the central one).
    const bytes = readFileSync(path);
    const first = bytes.subarray(0, 30 + 5 + 20);
    assert.equal(first.readUInt32LE(18), 0xffffffff);
    assert.equal(first.readUInt16LE(30 + 5), 0x0001);
    assert.equal(Number(first.readBigUInt64LE(30 + 5 + 4)), 5000);
    unzipTest(path);
  });

  test('an entry over 4 GiB, and one whose header starts past 4 GiB, get ZIP64 on their own', async () => {
    // A sparse file on disk: the big entry is a hole of zeros, so this needs almost no space, but every reader
    // still reads (and CRC-checks) all of its 4 GiB + 1 MiB.
    const size = 2 ** 32 + 2 ** 20;
    const zeros = new ZeroBlob(size);
    const big = { name: 'big/model.safetensors', blob: zeros, crc32: await crc32OfBlob(zeros) };
    assert.equal(big.crc32, crc32Zeros(size));
    const small = await entryOf('config.json', '{}');
    const parts = zipParts([small, big, await entryOf('after.json', '[1]')]);
    const path = join(scratch, 'big.zip');
    await writeParts(path, parts);
    assert.ok(statSync(path).blocks * 512 < 64 << 20, 'the test file should be sparse');
    const read = readZip(path);
    assert.equal(read.bad, null);
    assert.equal(read.locator, true, 'the central directory starts past 4 GiB');
    const [first, second, third] = read.entries;
    assert.deepEqual([first.zip64_extra, second.zip64_extra, third.zip64_extra], [false, true, true]);
    assert.equal(second.size, size);
    assert.equal(second.crc, big.crc32);
    assert.ok(third.offset > 2 ** 32);
    assert.equal(third.sha256, sha(Buffer.from('[1]')));
    // Info-ZIP finds every entry through the ZIP64 records too (`unzip -t` would take 20 s more to re-read the
    // zeros, which zipfile has CRC-checked already).
    if (HAVE_UNZIP) {
      const listed = execFileSync('unzip', ['-l', path], { encoding: 'utf8' });
      assert.match(listed, new RegExp(`\\b${size}\\b.*big/model\\.safetensors`));
      assert.match(listed, /after\.json/);
    }
  });

  test('names that could land outside the target folder, or twice, are refused', () => {
    const blob = new Blob(['x']);
    for (const name of ['', '/abs', 'a/../b', '..', './a', 'a//b', 'a\\b', 'dir/']) {
      assert.throws(() => zipParts([{ name, blob, crc32: 0 }]), /not a safe name/, name);
    }
    assert.throws(
      () => zipParts([{ name: 'a', blob, crc32: 0 }, { name: 'a', blob, crc32: 0 }]),
      /in the \.zip twice/,
    );
    assert.throws(() => zipParts([{ name: 'a', blob, crc32: -1 }]), /bad CRC-32/);
  });

  test('DOS dates are clamped to 1980..2107', () => {
    assert.deepEqual(dosDateTime(new Date(1970, 0, 1)), { time: 0, date: (1 << 5) | 1 });
    assert.equal(dosDateTime(new Date(2200, 0, 1)).date >> 9, 127);
  });
});

test('the archive is named after the inputs: their folder, or a lone file without its extension', () => {
  assert.equal(outputFolderName(['actor/iter_0000001/mp_rank_00/model_optim_rng.pt', 'actor/latest.txt']), 'actor-hf');
  assert.equal(outputFolderName(['full_weights.pt']), 'full_weights-hf');
  assert.equal(outputFolderName(['a.distcp', 'b.distcp']), 'ckptconv-output');
  assert.equal(outputFolderName(['x/a', 'y/b']), 'ckptconv-output');
  assert.equal(outputFolderName(['we:ird?.pt']), 'we_ird_-hf');
  assert.equal(outputFolderName([]), 'ckptconv-output');
});

/** The CRC-32 of `n` zero bytes, by squaring the zero-byte operator (zlib's crc32_combine method): no bytes read. */
function crc32Zeros(n) {
  const times = (mat, vec) => {
    let sum = 0;
    for (let i = 0; vec; i++, vec >>>= 1) if (vec & 1) sum ^= mat[i];
    return sum >>> 0;
  };
  const square = (mat) => mat.map((row) => times(mat, row));
  // The operator for one zero bit, then squared to one byte (8 bits).
  let op = [0xedb88320];
  for (let i = 1, row = 1; i < 32; i++, row <<= 1) op.push(row >>> 0);
  for (let i = 0; i < 3; i++) op = square(op);
  // CRC registers hold the complement, so start from ~0 and complement at the end.
  let crc = 0xffffffff;
  for (let bytes = n; bytes > 0; bytes = Math.floor(bytes / 2), op = square(op)) {
    if (bytes % 2) crc = times(op, crc);
  }
  return ~crc >>> 0;
}
