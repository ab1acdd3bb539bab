"""Deflate-compressed torch.save zips, made at test time: a real `torch.save` re-zipped with Python's zipfile
(ZIP_DEFLATED, every entry deflated, data.pkl included), as a user who re-zips a checkpoint gets it, and broken
copies whose one deflated entry lies about its size, fails its CRC-32 or has its deflate stream cut short.

Owns: tests/deflated.py. Imported by tests/e2e/test_deflate.py and wasi/test_wasi.py; web/test/page.test.mjs runs
`python tests/deflated.py FOLDER` (writes every file below into FOLDER).
"""

import io
import struct
import sys
import zipfile
import zlib
from pathlib import Path

EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry dates: the same bytes on every run
# Broken copies: file name -> (entry suffix, what is wrong, phrase the error must hold)
BROKEN = {
    "deflated_size_lies.pt": ("data/0", "inflates 4 KiB past the size its records declare", "inflates to more than"),
    "deflated_size_short.pt": ("data/0", "declares 4 KiB more than it inflates to", "inflates to only"),
    "deflated_crc_mismatch.pt": ("data/0", "its records give a CRC-32 with every bit flipped", "fails its crc-32 check"),
    "deflated_stream_cut.pt": ("data/0", "half of its deflate stream is missing", "cut short"),
    "deflated_pickle_crc_mismatch.pt": ("data.pkl", "data.pkl's CRC-32 has every bit flipped", "fails its crc-32 check"),
}


def state_dict():
    """Tensors that exercise every read path over a deflated storage: storages larger than one 8 MiB band (read in
    several forward steps), a transposed view (read band by band, each band starting the entry over), a slice at an
    offset, two names over one storage, bf16, int64, a 0-d tensor and an all-zero storage (deflates ~1000x)."""
    import torch  # here, so that importing this module (rezip, broken) needs no torch

    g = torch.Generator().manual_seed(16)
    embed = torch.randn(4096, 768, generator=g)  # 12 MiB
    square = torch.randn(1536, 1536, generator=g)  # 9 MiB
    wide = torch.randn(64, 100, generator=g)
    return {
        "model.embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same storage under two names
        "model.proj.weight": square.t(),
        "model.slice": wide[10:20, 3:],
        "model.norm.weight": torch.ones(768),
        "model.bf16": torch.randn(300, 7, generator=g).to(torch.bfloat16),
        "model.ids": torch.arange(1000, dtype=torch.int64),
        "model.zeros": torch.zeros(1 << 18),
        "model.scalar": torch.tensor(3.5),
    }


def saved():
    """A real torch.save of state_dict(): stored entries, root folder `archive/`."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict(), buf)
    return buf.getvalue()


def entries(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rezip(raw, level=6):
    """The archive `raw` with every entry deflated, in the same order under the same names."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for name, data in entries(raw):
            # A ZipInfo keeps its own compression (stored) unless told: say deflated, at this level.
            z.writestr(zipfile.ZipInfo(name, date_time=EPOCH), data, zipfile.ZIP_DEFLATED, level)
    return out.getvalue()


def deflate(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate, as zip entries hold it
    return c.compress(data) + c.flush()


def with_raw_entry(raw, suffix, compressed, size, crc):
    """The archive `raw` re-zipped deflated, except that the entry whose name ends with `suffix` holds `compressed`
    as its deflate stream and declares `size` and `crc` (zipfile writes it stored; its local header and directory
    record are then patched to method 8 and the given size and CRC)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries(raw):
            ours = name.endswith(suffix)
            method = zipfile.ZIP_STORED if ours else zipfile.ZIP_DEFLATED
            z.writestr(zipfile.ZipInfo(name, date_time=EPOCH), compressed if ours else data, method)
    b = bytearray(out.getvalue())
    (count, cd_size, cd_offset) = struct.unpack_from("<HII", b, len(b) - 22 + 10)
    at = cd_offset
    patched = 0
    for _ in range(count):
        assert b[at:at + 4] == b"PK\x01\x02"
        n, x, c = struct.unpack_from("<HHH", b, at + 28)
        name = bytes(b[at + 46:at + 46 + n]).decode()
        if name.endswith(suffix):
            (local,) = struct.unpack_from("<I", b, at + 42)
            assert b[local:local + 4] == b"PK\x03\x04"
            struct.pack_into("<H", b, at + 10, 8)  # method
            struct.pack_into("<I", b, at + 16, crc)
            struct.pack_into("<I", b, at + 24, size)  # uncompressed size
            struct.pack_into("<H", b, local + 8, 8)
            struct.pack_into("<I", b, local + 14, crc)
            struct.pack_into("<I", b, local + 22, size)
            patched += 1
        at += 46 + n + x + c
    assert patched == 1, (suffix, patched)
    return bytes(b)


def broken(raw, file):
    """The broken copy `file` (a key of BROKEN) of the torch.save archive `raw`."""
    suffix = BROKEN[file][0]
    (data,) = [d for n, d in entries(raw) if n.endswith("/" + suffix)]
    crc = zlib.crc32(data)
    if file == "deflated_size_lies.pt":
        return with_raw_entry(raw, suffix, deflate(data + bytes(4096)), len(data), crc)
    if file == "deflated_size_short.pt":
        return with_raw_entry(raw, suffix, deflate(data), len(data) + 4096, crc)
    if file in ("deflated_crc_mismatch.pt", "deflated_pickle_crc_mismatch.pt"):
        return with_raw_entry(raw, suffix, deflate(data), len(data), crc ^ 0xFFFFFFFF)
    if file == "deflated_stream_cut.pt":
        stream = deflate(data)
        return with_raw_entry(raw, suffix, stream[:len(stream) // 2], len(data), crc)
    raise KeyError(file)


def write_all(folder):
    """Writes deflated.pt, its stored original original.pt and every broken copy into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = saved()
    (folder / "original.pt").write_bytes(raw)
    (folder / "deflated.pt").write_bytes(rezip(raw))
    for file in BROKEN:
        (folder / file).write_bytes(broken(raw, file))
    return folder


if __name__ == "__main__":
    write_all(sys.argv[1])
