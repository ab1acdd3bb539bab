"""Parser differentials (issue #16): files that Python's unpicklers, torch.load, tarfile or zipfile read in another
way than reading the bytes straight on (what ckptconv did), each built at test time from real torch.save, pickle,
pickletools, tarfile, zipfile and torch.distributed.checkpoint output. Imported by tests/e2e/test_differential.py
(native) and wasi/test_wasi.py (under wasmtime).

Owns: tests/hostile/differential.py. `cases()` lists every case; `case.build(folder)` writes its input into
`folder` and returns its path. `case.demo` is a Python script that shows what Python or torch does with the same
bytes (its asserts are the facts the refusal rests on); it is run in a subprocess with the input's folder as its
working directory and the input's name as argv[1]. Payloads only ever `touch` a file named `case.marker` in that
folder (relative path), so where the demo proves a hidden reading live (torch.load(weights_only=False) runs it),
the test sees the marker appear, and where ckptconv reads the file, nothing may appear.

The cases, by the reader that disagrees:
  _pickle.c reading a file-like object (torch.load's zip path reads data.pkl through io.BytesIO) drops the rest
    of a frame when an opcode runs past it, and takes the opcode's argument from after the frame;
  _pickle.c reading a real file consumes a large frame whole, so a STOP before the frame's end leaves the file
    at the frame's end, where torch.load's legacy path reads its next pickle;
  pickle.py (`pickle._Unpickler`, which torch.load uses when given it as pickle_module) reads a frame alone;
  torch.load tries tarfile before the legacy pickles, and zip only when the local-header magic is at byte 0;
  torch's zip reader (miniz) finds names without regard to case, takes the archive folder from the first entry,
    and hands a zip with constants.pkl to torch.jit.load;
  zipfile finds the central directory right before the end records, miniz at its recorded offset;
  fickling's polyglot module (create_zip_pickle_polyglot, create_mar_legacy_pickle_polyglot,
    create_standard_torchscript_polyglot) appends one file to another or adds TorchScript records to a zip.
"""

import io
import os
import pickle
import pickletools
import struct
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# The demo scripts start with this: `path` is the input, `pure` a pickle module whose Unpickler is pickle.py's
# (torch.load(..., pickle_module=pure) reads with it), `raises(fn, text)` checks an exception's message.
DEMO_PRELUDE = """
import io, os, pickle, sys, tarfile, types, warnings, zipfile
import torch
warnings.simplefilter("ignore")
path = sys.argv[1]
pure = types.ModuleType("pure_pickle")
pure.Unpickler, pure.load, pure.loads = pickle._Unpickler, pickle._load, pickle._loads
pure.__name__ = "pure_pickle"

def raises(fn, text):
    try:
        got = fn()
    except Exception as e:
        assert text in str(e), f"{type(e).__name__}: {e}"
        return
    raise AssertionError(f"no error, got {got!r}")
"""


@dataclass(frozen=True)
class Case:
    name: str  # the input's file or folder name
    kind: str  # ckptconv's error kind
    expect: tuple  # substrings, one of which ckptconv's lowercased message must hold
    build: Callable  # build(folder) -> path of the input
    demo: str  # a Python script: what Python / torch reads (see the module docstring)
    marker: str = ""  # set when the demo shows a payload live under torch.load
    why: str = ""


def _torch():
    import torch

    return torch


def _state(seed=0, n=6):
    torch = _torch()
    return {"w": torch.arange(n, dtype=torch.float32) + seed}


def _save(obj, legacy=False, **kw):
    buf = io.BytesIO()
    _torch().save(obj, buf, _use_new_zipfile_serialization=not legacy, **kw)
    return buf.getvalue()


def _rezip(zip_bytes, edit=lambda name, data: [(name, data)]):
    """The entries of a torch.save zip written again (stored, as torch writes), `edit` giving what to write."""
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for info in src.infolist():
                for name, data in edit(info.filename, src.read(info.filename)):
                    z.writestr(zipfile.ZipInfo(name), data)
    return out.getvalue()


def _with_data_pkl(zip_bytes, fn):
    return _rezip(zip_bytes, lambda n, d: [(n, fn(d) if n.endswith("/data.pkl") else d)])


def _touch(marker):
    """A protocol-0 pickle calling os.system('touch MARKER'), written byte by byte (never built from live objects)."""
    return b"cos\nsystem\n(Vtouch " + marker.encode() + b"\ntR."


def _pickle_ends(data, count):
    """Offsets just after each of the first `count` pickles in `data` (pickletools reads without running them)."""
    f, ends = io.BytesIO(data), []
    for _ in range(count):
        for _op in pickletools.genops(f):
            pass
        ends.append(f.tell())
    return ends


def _write(folder, name, data):
    p = folder / name
    p.write_bytes(data)
    return p


# --- frames -------------------------------------------------------------------------------------------------------

def frame_straddle(folder):
    """data.pkl: PROTO, then a 2-byte FRAME holding `M` (BININT2) and one byte of its argument. Read straight on,
    M takes the byte after the frame as its second byte, then SHORT_BINBYTES of 99 bytes (length 'c') skips a
    hidden `os.system` call and the real data.pkl follows. _pickle.c reading io.BytesIO (torch.load's zip path)
    drops the frame's byte and reads M's two bytes from after the frame, so it lands on the 'c' and runs
    GLOBAL os.system. Both readings end with two values that `00` pops, then the same state dict."""
    marker = "marker_frame_straddle"
    cmd = f"touch {marker}".encode().ljust(99 - 17, b" ")
    hidden = b"os\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R"
    assert len(hidden) == 99
    good = _save(_state())
    pkl = b"\x80\x02\x95" + struct.pack("<Q", 2) + b"M\x01" + b"\x02" + b"C" + b"c" + hidden + b"00"
    return _write(folder, "frame_straddle.pt", _with_data_pkl(good, lambda d: pkl + d[2:]))


FRAME_STRADDLE_DEMO = """
want = {"w": torch.arange(6, dtype=torch.float32)}
# pickle.py reads the frame alone and stops where M runs past it
raises(lambda: torch.load(path, weights_only=False, pickle_module=pure), "pickle exhausted before end of frame")
# torch's weights_only unpickler has no FRAME opcode
raises(lambda: torch.load(path, weights_only=True), "Unsupported operand 149")
assert not os.path.exists("marker_frame_straddle")
got = torch.load(path, weights_only=False)  # _pickle.c over io.BytesIO: the same state dict, and the payload ran
assert got.keys() == want.keys() and torch.equal(got["w"], want["w"]), got
assert os.path.exists("marker_frame_straddle")
"""


def frame_past_stop(folder):
    """A legacy torch.save file whose first pickle (the magic number) gets a FRAME that runs 20,000 bytes into the
    first storage's data. Read straight on, STOP ends the pickle and the protocol, sys_info, object and key
    pickles follow, then the storage (its bytes at the frame's end overwritten with a pickle that runs
    os.system: one float changes). _pickle.c reading the real file (torch.load's legacy path) reads a frame
    larger than its prefetch with one read(), so after STOP the file is at the frame's end: the next pickle
    torch.load reads, the 'protocol version', is the payload."""
    marker = "marker_frame_past_stop"
    leg = _save(_state(n=16384), legacy=True)
    assert leg[:3] == b"\x80\x02\x8a" and leg[14:15] == b"."
    keys_end = _pickle_ends(leg[15:], 4)[-1] + 15
    frame_end = keys_end + 8 + 20000  # 8: the first storage's element count
    new = bytearray(leg[:2] + b"\x95" + struct.pack("<Q", frame_end - 2) + leg[2:])
    payload = _touch(marker)
    new[frame_end + 9:frame_end + 9 + len(payload)] = payload
    return _write(folder, "frame_past_stop.pt", bytes(new))


FRAME_PAST_STOP_DEMO = """
with open(path, "rb") as f:
    assert pickle.load(f) == 0x1950A86A20F9469CFC6C
    assert f.tell() > 20000, f.tell()  # the frame's end, not after STOP (byte 24)
raises(lambda: torch.load(path, weights_only=True), "Unsupported operand 149")
assert not os.path.exists("marker_frame_past_stop")
raises(lambda: torch.load(path, weights_only=False), "Invalid protocol version: 0")  # os.system returned 0
assert os.path.exists("marker_frame_past_stop")
"""


def _frame_of_data_pkl(edit):
    """A torch.save zip whose data.pkl is protocol 4 (framed), with `edit(pkl, frame_size_at, frame_size)`."""
    good = _save(_state(), pickle_protocol=4)

    def fix(d):
        assert d[:3] == b"\x80\x04\x95", d[:12]
        return edit(d, 3, struct.unpack_from("<Q", d, 3)[0])

    return _with_data_pkl(good, fix)


def frame_too_long(folder):
    """data.pkl (protocol 4, one frame) whose FRAME claims 5 bytes more than the pickle holds: pickle.py reads
    the short frame and loads; _pickle.c needs the whole frame first ('pickle data was truncated')."""
    data = _frame_of_data_pkl(lambda d, at, n: d[:at] + struct.pack("<Q", n + 5) + d[at + 8:])
    return _write(folder, "frame_too_long.pt", data)


FRAME_TOO_LONG_DEMO = """
got = torch.load(path, weights_only=False, pickle_module=pure)
assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32)), got
raises(lambda: torch.load(path, weights_only=False), "pickle data was truncated")
"""


def frame_in_frame(folder):
    """data.pkl (protocol 4) whose frame starts with a second FRAME header: _pickle.c reads on and loads;
    pickle.py refuses ('beginning of a new frame before end of current frame')."""
    data = _frame_of_data_pkl(
        lambda d, at, n: d[:at] + struct.pack("<Q", n + 9) + b"\x95" + struct.pack("<Q", n) + d[at + 8:])
    return _write(folder, "frame_in_frame.pt", data)


FRAME_IN_FRAME_DEMO = """
got = torch.load(path, weights_only=False)
assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32)), got
raises(lambda: torch.load(path, weights_only=False, pickle_module=pure), "beginning of a new frame before end of current frame")
"""


# --- data after the end -------------------------------------------------------------------------------------------

def data_pkl_trailing(folder):
    """data.pkl followed by a second pickle that calls os.system: torch.load stops at the first STOP and never
    reads it, but a scanner that reads every pickle in the entry (or pickletools) does."""
    data = _with_data_pkl(_save(_state()), lambda d: d + _touch("marker_never"))
    return _write(folder, "data_pkl_trailing.pt", data)


DATA_PKL_TRAILING_DEMO = """
assert torch.equal(torch.load(path)["w"], torch.arange(6, dtype=torch.float32))
pkl = zipfile.ZipFile(path).read("archive/data.pkl")
import pickletools
f = io.BytesIO(pkl)
for _ in pickletools.genops(f):
    pass
ops = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]  # the second pickle, after the first STOP
assert ("GLOBAL", "os system") in ops, ops
"""


def dcp_metadata_trailing(folder):
    """A real single-process dcp.save whose .metadata gets a second pickle appended: DCP's reader unpickles the
    first and never looks further."""
    torch = _torch()
    import torch.distributed.checkpoint as dcp

    d = folder / "dcp_metadata_trailing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6, dtype=torch.float32)}, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
    with open(d / ".metadata", "ab") as f:
        f.write(_touch("marker_never"))
    return d


DCP_METADATA_TRAILING_DEMO = """
import torch.distributed.checkpoint as dcp
md = dcp.FileSystemReader(path).read_metadata()
assert list(md.state_dict_metadata) == ["w"], md
state = {"w": torch.zeros(6)}
dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32))
"""


def legacy_then_zip(folder):
    """fickling's create_zip_pickle_polyglot(zip, pickle): a torch.save zip appended to a legacy torch.save file
    of other weights. torch.load reads the legacy pickles (the zip magic is not at byte 0); zipfile and every
    zip-based scanner read the appended zip."""
    return _write(folder, "legacy_then_zip.pt", _save(_state(0), legacy=True) + _save(_state(100)))


LEGACY_THEN_ZIP_DEMO = """
assert torch.equal(torch.load(path)["w"], torch.arange(6, dtype=torch.float32))
z = zipfile.ZipFile(path)
assert "archive/data.pkl" in z.namelist(), z.namelist()
"""


def pickle_then_zip(folder):
    """The same with a bare pickle first (pickle.dumps of a dict): pickle.load reads the dict, zipfile the zip,
    torch.load neither ('Invalid magic number')."""
    return _write(folder, "pickle_then_zip.pt", pickle.dumps({"step": 7}, protocol=2) + _save(_state(100)))


PICKLE_THEN_ZIP_DEMO = """
with open(path, "rb") as f:
    assert pickle.load(f) == {"step": 7}
assert "archive/data.pkl" in zipfile.ZipFile(path).namelist()
raises(lambda: torch.load(path, weights_only=False), "Invalid magic number")
"""


def zip_then_legacy(folder):
    """fickling's create_mar_legacy_pickle_polyglot order: a legacy torch.save file appended to a torch.save zip.
    torch.load reads the zip (miniz finds the end record within the last 64 KiB) and ignores the pickles."""
    return _write(folder, "zip_then_legacy.pt", _save(_state(0)) + _save(_state(100), legacy=True))


ZIP_THEN_LEGACY_DEMO = """
assert torch.equal(torch.load(path)["w"], torch.arange(6, dtype=torch.float32))
data = open(path, "rb").read()
at = data.index(bytes([0x80, 0x02, 0x8a, 0x0a]))  # the legacy stream behind the zip
f = io.BytesIO(data[at:])
assert pickle.load(f) == 0x1950A86A20F9469CFC6C
"""


# --- containers ---------------------------------------------------------------------------------------------------

def tar_legacy_polyglot(folder):
    """A legacy torch.save file whose first 512 bytes are also a valid tar header: the magic-number pickle becomes
    PROTO, BINBYTES of the header's bytes 7..511, POP, the magic, STOP. The tar's first member covers the rest
    of the legacy stream; after it come tar members 'storages', 'tensors', 'pickle' as torch's pre-0.4 tar
    layout names them, 'storages' a pickle that runs os.system. torch.load tries tarfile.open first."""
    marker = "marker_tar_legacy"
    leg = _save(_state(), legacy=True)
    assert leg[:3] == b"\x80\x02\x8a" and leg[14:15] == b"."
    tail = b"0" + leg[2:]  # POP the header bytes, then the magic and the rest of the legacy stream
    info = tarfile.TarInfo("x")
    info.size = len(tail)
    hdr = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    hdr[0:7] = b"\x80\x02B" + struct.pack("<I", 512 - 7)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    head = bytes(hdr) + tail
    head += b"\0" * (-len(head) % 512)
    t = io.BytesIO()
    with tarfile.open(fileobj=t, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("storages", _touch(marker)), ("tensors", b"K\x00."), ("pickle", b"N.")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    return _write(folder, "tar_legacy_polyglot.pt", head + t.getvalue())


TAR_LEGACY_DEMO = """
with open(path, "rb") as f:  # the legacy reading: the magic, then the rest as torch.save wrote it
    assert pickle.load(f) == 0x1950A86A20F9469CFC6C
names = tarfile.open(path, "r:").getnames()
assert names[1:] == ["storages", "tensors", "pickle"], names
raises(lambda: torch.load(path, weights_only=True), "Cannot use ``weights_only=True`` with files saved in the legacy .tar format")
assert not os.path.exists("marker_tar_legacy")
raises(lambda: torch.load(path, weights_only=False), "")  # it fails, after running the tar's storages pickle
assert os.path.exists("marker_tar_legacy")
"""


def empty_zip_magic(folder):
    """A file that starts with an end record (PK\\x05\\x06, garbage fields) followed by a torch.save zip that
    zipfile's append mode writes after it: zipfile reads the zip, torch.load does not (not PK\\x03\\x04 at
    byte 0, so the legacy pickle route, which fails)."""
    p = _write(folder, "empty_zip_magic.pt", b"PK\x05\x06" + b"\xff" * 30)
    src = zipfile.ZipFile(io.BytesIO(_save(_state())))
    with zipfile.ZipFile(p, "a") as z:
        for n in src.namelist():
            z.writestr(zipfile.ZipInfo(n), src.read(n))
    assert p.read_bytes()[:4] == b"PK\x05\x06"
    return p


EMPTY_ZIP_MAGIC_DEMO = """
assert "archive/data.pkl" in zipfile.ZipFile(path).namelist()
raises(lambda: torch.load(path, weights_only=False), "persistent")  # PERSID 'P': the legacy pickle route
"""


def torchscript_records(folder):
    """A torch.save zip with an archive/constants.pkl record: torch.load hands it to torch.jit.load."""
    data = _rezip(_save(_state()), lambda n, d: [(n, d)] + ([("archive/constants.pkl", b"\x80\x02).")]
                                                           if n.endswith("/version") else []))
    return _write(folder, "torchscript_records.pt", data)


TORCHSCRIPT_DEMO = """
raises(lambda: torch.load(path, weights_only=True), "Cannot use ``weights_only=True`` with TorchScript archives")
"""


def fickling_torchscript_polyglot(folder):
    """fickling's create_standard_torchscript_polyglot: a torch.save zip, then constants.pkl and version added at
    the top level with zipfile's append mode. torch's reader refuses entries outside the archive folder."""
    p = _write(folder, "fickling_torchscript_polyglot.pt", _save(_state()))
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("constants.pkl", b"\x80\x02).")
        z.writestr("version", b"3\n")
    return p


FICKLING_TORCHSCRIPT_DEMO = """
raises(lambda: torch.load(path, weights_only=True), "file in archive is not in a subdirectory")
"""


def byteorder_case(folder):
    """archive/BYTEORDER (upper case) saying 'big': torch's reader finds it for 'byteorder' and byte-swaps the
    data; a reader that looks names up exactly finds no byteorder record and assumes little-endian."""
    data = _rezip(_save(_state(1)), lambda n, d: [("archive/BYTEORDER", b"big") if n.endswith("/byteorder")
                                                   else (n, d)])
    return _write(folder, "byteorder_case.pt", data)


BYTEORDER_CASE_DEMO = """
got = torch.load(path)["w"]
little = torch.arange(6, dtype=torch.float32) + 1
assert torch.equal(got, torch.from_numpy(little.numpy().view(">f4").astype("float32"))), got  # byte-swapped
"""


def case_duplicate(folder):
    """archive/data.pkl and archive/DATA.PKL (other weights): two entries to zipfile, one name to torch's
    reader, which picks one by its own search order."""
    other = zipfile.ZipFile(io.BytesIO(_save(_state(100)))).read("archive/data.pkl")
    data = _rezip(_save(_state()), lambda n, d: [(n, d)] + ([("archive/DATA.PKL", other)]
                                                           if n.endswith("/data.pkl") else []))
    return _write(folder, "case_duplicate.pt", data)


CASE_DUPLICATE_DEMO = """
names = zipfile.ZipFile(path).namelist()
assert "archive/data.pkl" in names and "archive/DATA.PKL" in names, names
r = torch._C.PyTorchFileReader(path)
assert r.has_record("DATA.PKL") and r.has_record("Data.Pkl")  # one name to torch, whatever the case
"""


def cd_gap(folder):
    """A torch.save zip with 64 bytes between the central directory and the zip64 end record (the locator's
    offset moved to match): torch's reader follows the offsets and loads it; zipfile looks for the directory
    right before the end records and finds something else."""
    data = bytearray(_save(_state()))
    eocd = data.rindex(b"PK\x05\x06")
    loc = eocd - 20
    assert data[loc:loc + 4] == b"PK\x06\x07"
    z64 = struct.unpack_from("<Q", data, loc + 8)[0]
    assert data[z64:z64 + 4] == b"PK\x06\x06" and z64 + 56 == loc
    struct.pack_into("<Q", data, loc + 8, z64 + 64)
    return _write(folder, "cd_gap.pt", bytes(data[:z64]) + b"\0" * 64 + bytes(data[z64:]))


CD_GAP_DEMO = """
assert torch.equal(torch.load(path)["w"], torch.arange(6, dtype=torch.float32))
raises(lambda: zipfile.ZipFile(path).namelist(), "")
"""


def cases():
    F = "frame"
    return [
        Case("frame_straddle.pt", "pickle", ("past the end of its frame",), frame_straddle, FRAME_STRADDLE_DEMO,
             marker="marker_frame_straddle", why=f"an opcode straddles its {F}'s end"),
        Case("frame_past_stop.pt", "pickle", ("stop inside a frame",), frame_past_stop, FRAME_PAST_STOP_DEMO,
             marker="marker_frame_past_stop", why="a frame runs past its pickle's STOP"),
        Case("frame_too_long.pt", "truncated", ("frame of",), frame_too_long, FRAME_TOO_LONG_DEMO,
             why="a frame longer than the pickle"),
        Case("frame_in_frame.pt", "pickle", ("frame begins inside the frame",), frame_in_frame, FRAME_IN_FRAME_DEMO,
             why="a FRAME inside a frame"),
        Case("data_pkl_trailing.pt", "pickle", ("after the pickle's stop",), data_pkl_trailing,
             DATA_PKL_TRAILING_DEMO, why="a second pickle after data.pkl's STOP"),
        Case("dcp_metadata_trailing", "pickle", ("after the pickle's stop",), dcp_metadata_trailing,
             DCP_METADATA_TRAILING_DEMO, why="a second pickle after .metadata's STOP"),
        Case("legacy_then_zip.pt", "not-checkpoint", ("after the last storage",), legacy_then_zip,
             LEGACY_THEN_ZIP_DEMO, why="fickling zip/pickle polyglot: a zip after a legacy file"),
        Case("pickle_then_zip.pt", "pickle", ("after the pickle's stop",), pickle_then_zip, PICKLE_THEN_ZIP_DEMO,
             why="a zip after a bare pickle"),
        Case("zip_then_legacy.pt", "zip", ("after the zip's end record",), zip_then_legacy, ZIP_THEN_LEGACY_DEMO,
             why="fickling MAR/pickle polyglot order: a legacy file after a zip"),
        Case("tar_legacy_polyglot.pt", "unsupported", ("also a tar archive",), tar_legacy_polyglot, TAR_LEGACY_DEMO,
             marker="marker_tar_legacy", why="a legacy file that is also a tar"),
        Case("empty_zip_magic.pt", "not-checkpoint", ("50 4b 05 06",), empty_zip_magic, EMPTY_ZIP_MAGIC_DEMO,
             why="a zip that does not start with a local header"),
        Case("torchscript_records.pt", "unsupported", ("torchscript",), torchscript_records, TORCHSCRIPT_DEMO,
             why="a torch zip with TorchScript's constants.pkl"),
        Case("fickling_torchscript_polyglot.pt", "zip", ("outside the archive folder",), fickling_torchscript_polyglot,
             FICKLING_TORCHSCRIPT_DEMO, why="fickling's torch.save/TorchScript polyglot"),
        Case("byteorder_case.pt", "unsupported", ("byte order 'big'",), byteorder_case, BYTEORDER_CASE_DEMO,
             why="a byteorder record found only without regard to case"),
        Case("case_duplicate.pt", "zip", ("differ only in case",), case_duplicate, CASE_DUPLICATE_DEMO,
             why="two entries one name apart in case"),
        Case("cd_gap.pt", "zip", ("central directory ends at byte",), cd_gap, CD_GAP_DEMO,
             why="a gap between the central directory and the end records"),
    ]
