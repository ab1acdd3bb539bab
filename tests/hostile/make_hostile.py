"""Generate hostile inputs that ckptconv must refuse cleanly (exit 1, clear message, no output, no panic).

Owns: the files directly in tests/hostile/ (every input, plus expected.json). The folder-shaped cases under
tests/hostile/dcp/ and tests/hostile/megatron/ come from tests/fixtures/make_dcp_fixtures.py and
make_megatron_fixtures.py (they are copies of real fixtures, broken one way each).

expected.json maps file name -> {"kind": error kind, "expect": [substrings], "why": text}. ckptconv must exit 1
with `ckptconv: error[KIND]:`, and its stderr, lowercased, must contain at least one of the substrings. Keys
starting with "_" are comments. tests/hostile/corpus.py gathers all three expected.json files for the tests. Pickles are written byte by byte
(never via pickle.dumps of live objects) so no generator step can run them, and every command they carry
only touches CANARY, which the e2e tests check is never created.

Run from anywhere:  .venv/bin/python tests/fixtures/make_hostile.py
"""

import io
import json
import os
import random
import struct
import warnings
import zipfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent
CANARY = "/tmp/ckptconv_hostile_canary"
EXPECTED = {"_comment": "file -> {kind: error kind, expect: substrings, any one of which must appear in lowercased stderr; why}"}

# --- pickle opcode helpers (protocol 2 unless noted) ---------------------------------------------------
PROTO2 = b"\x80\x02"
STOP = b"."


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def ustr(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def long_put(i):
    return b"r" + struct.pack("<I", i)


def long_get(i):
    return b"j" + struct.pack("<I", i)


def call1(module, name, arg):
    """REDUCE(module.name, (arg,)) with a protocol-2 GLOBAL."""
    return PROTO2 + glob(module, name) + arg + b"\x85R" + STOP


def tensor(key, numel, size, stride, offset=0, storage="FloatStorage"):
    """_rebuild_tensor_v2 fragment exactly as torch.save writes it (typed storage as persistent id)."""
    ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", x) if -2**31 <= x < 2**31 else b"\x8a\x08" + struct.pack("<q", x) for x in xs) + b"t"
    pid = b"(" + ustr("storage") + glob("torch", storage) + ustr(key) + ustr("cpu") + b"\x8a\x08" + struct.pack("<q", numel) + b"tQ"
    args = pid + b"\x8a\x08" + struct.pack("<q", offset) + ints(size) + ints(stride) + b"\x89" + glob("collections", "OrderedDict") + b")R"
    return glob("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def torch_zip(pkl, storages=(), root="archive", pkl_name="data.pkl"):
    """A zip laid out like torch.save's (STORED entries, fixed timestamps so the bytes are reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        def put(name, data):
            z.writestr(zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0)), data)
        put(pkl_name, pkl)
        put("byteorder", b"little")
        for key, data in storages:
            put(f"data/{key}", data)
        put("version", b"3\n")
    return buf.getvalue()


def write(name, data, expect, why, kind):
    (OUT / name).write_bytes(data)
    EXPECTED[name] = {"kind": kind, "expect": expect if isinstance(expect, list) else [expect], "why": why}


def real_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def main():
    for old in OUT.iterdir():  # everything this script wrote before; not the scripts nor the dcp/ and megatron/ cases
        if old.is_file() and old.suffix != ".py":
            old.unlink()
    touch = f"touch {CANARY}"

    # --- code execution through REDUCE: plain pickle named .pt, and the same bytes as archive/data.pkl ---
    calls = {
        "os_system": call1("os", "system", ustr(touch)),
        "builtins_eval": call1("builtins", "eval", ustr(f"__import__('os').system('{touch}')")),
        "subprocess_popen": call1("subprocess", "Popen", b"(" + ustr("touch") + ustr(CANARY) + b"l"),
        "posix_system": call1("posix", "system", ustr(touch)),
    }
    for stem, pkl in calls.items():
        g = stem.replace("_", ".", 1).replace("popen", "Popen")
        write(f"pickle_{stem}.pt", pkl, g, f"REDUCE of {g} in a bare pickle (torch.load would run it while reading the legacy magic)", kind="unsafe-global")
        write(f"zip_{stem}.pt", torch_zip(pkl), g, f"REDUCE of {g} as the data.pkl of a torch-style zip", kind="unsafe-global")
    # Python maps the py2 module name __builtin__ to builtins, so this is as live as builtins.eval.
    write("pickle_py2_builtin_eval.pt", call1("__builtin__", "eval", ustr(f"__import__('os').system('{touch}')")),
          "eval", "REDUCE of __builtin__.eval (py2 spelling that Python's unpickler still resolves)", kind="unsafe-global")
    # Protocol 4: STACK_GLOBAL inside a FRAME instead of the text GLOBAL opcode.
    body = b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94" + b"\x8c" + bytes([len(touch)]) + touch.encode() + b"\x94\x85\x94R\x94."
    write("pickle_p4_stack_global.pt", b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body, "os.system",
          "protocol-4 STACK_GLOBAL os.system inside a FRAME", kind="unsafe-global")

    # A real torch.save whose dict holds valid tensors AND an object that reduces to os.system; pickle
    # records os.system under its defining module, posix. Built without ever calling the payload.
    class Evil:
        def __reduce__(self):
            return (os.system, (touch,))
    write("zip_mixed_tensor_and_posix_system.pt", real_torch_save({"w": torch.zeros(4), "evil": Evil()}),
          "posix.system", "genuine torch.save file: valid tensors plus a posix.system REDUCE must still be refused", kind="unsafe-global")

    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(4), "evil": Evil()}, legacy, _use_new_zipfile_serialization=False)
    write("legacy_mixed_tensor_and_posix_system.pt", legacy.getvalue(), "posix.system",
          "legacy (pre-1.6) format: valid magic/protocol/sys-info pickles, then an object pickle calling posix.system", kind="unsafe-global")

    # --- broken containers -----------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    good = real_torch_save({f"layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)})
    write("truncated_half.pt", good[: len(good) // 2], ["truncated", "end-of-central-directory"], "torch zip cut at half: no central directory", kind="truncated")
    cd_off = struct.unpack_from("<I", good, good.rindex(b"PK\x05\x06") + 16)[0]
    write("truncated_in_central_dir.pt", good[: cd_off + 40], ["truncated", "end-of-central-directory"], "torch zip cut inside the central directory", kind="truncated")
    legacy = io.BytesIO()
    torch.save({f"layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)}, legacy, _use_new_zipfile_serialization=False)
    legacy = legacy.getvalue()
    write("legacy_truncated.pt", legacy[: len(legacy) - 300], "truncated", "legacy format cut inside the last storage's bytes", kind="truncated")
    eocd = good.rindex(b"PK\x05\x06")
    bad = bytearray(good)
    struct.pack_into("<I", bad, eocd + 16, 0xFFFFFF00)
    write("zip_cd_offset_past_eof.pt", bytes(bad), ["truncated", "zip"], "EOCD points the central directory past the end of file", kind="zip")
    # Central-directory entry for data/0 claims a size far past EOF: reading it must fail, not allocate.
    bad = bytearray(good)
    cd = bad.index(b"PK\x01\x02" , cd_off)
    while not bad[cd + 46: cd + 46 + struct.unpack_from("<H", bad, cd + 28)[0]].endswith(b"data/0"):
        cd = bad.index(b"PK\x01\x02", cd + 4)
    struct.pack_into("<II", bad, cd + 20, 0x7FFFFFF0, 0x7FFFFFF0)  # compressed, uncompressed size
    write("zip_entry_past_eof.pt", bytes(bad), ["truncated", "zip", "storage", "bounds"], "a storage entry whose size runs past end of file", kind="zip")
    write("zip_no_data_pkl.pt", torch_zip(PROTO2 + b"}" + STOP, pkl_name="model.pkl"), ["data.pkl", "not a torch"],
          "a torch-shaped zip whose pickle is not named data.pkl is not a torch.save file", kind="not-checkpoint")

    rnd = random.Random(7)
    junk = bytes(rnd.getrandbits(8) for _ in range(4096))
    assert junk[0] not in (0x80, ord("P")), "random bytes must not look like a pickle or a zip"
    write("random_bytes.pt", junk, "not a torch", "neither zip nor pickle", kind="not-checkpoint")
    write("empty.pt", b"", ["not a torch", "empty"], "zero-length file", kind="not-checkpoint")

    # --- pickle resource bombs -------------------------------------------------------------------------
    n = 100_000
    write("deep_empty_list_append.pt", PROTO2 + b"]" * n + b"a" * (n - 1) + STOP, ["depth", "nested deeper"],
          "100000 nested lists built with EMPTY_LIST/APPEND: a recursive walker overflows the native stack", kind="limit")
    write("deep_mark_list.pt", PROTO2 + b"(" * n + b"l" * n + STOP, "depth", "100000 nested MARK/LIST", kind="limit")
    deep = PROTO2 + b"}" + ustr("w") + tensor("0", 4, [4], [1]) + b"s" + ustr("deep") + b"]" * n + b"a" * (n - 1) + b"s" + STOP
    write("zip_deep_nesting_with_tensor.pt", torch_zip(deep, [("0", bytes(16))]),
          ["depth", "nested deeper"], "a valid tensor next to 100000-deep nested lists inside a torch zip", kind="limit")

    write("memo_huge_index.pt", PROTO2 + b"N" + long_put(4_000_000_000) + b"0" + b"]" + long_get(4_000_000_000) + b"a" + STOP,
          ["memo", "no tensors"], "LONG_BINPUT at index 4e9: a dense memo would allocate 4e9 slots; the result holds no tensors", kind="no-tensors")
    write("memo_dangling_get.pt", PROTO2 + long_get(4_000_000_000) + STOP, "memo", "LONG_BINGET of a memo key never stored", kind="pickle")
    # MEMOIZE (protocol 4) stores the top of stack again each time: 1 byte per memo entry, 2x the 4M default limit.
    write("memo_many.pt", b"\x80\x04N" + b"\x94" * 8_000_001 + STOP, "memo", "8 million memo entries", kind="limit")

    laughs = PROTO2 + b"]" + long_put(0) + b"0"
    for i in range(1, 61):  # memo[i] = [memo[i-1], memo[i-1]]: 2^60 leaf paths, 60 levels
        laughs += b"(" + long_get(i - 1) + long_get(i - 1) + b"l" + long_put(i) + b"0"
    write("billion_laughs.pt", laughs + long_get(60) + STOP, ["no tensors", "limit"],
          "lists doubling through the memo 60 times: walking every path never ends", kind="limit")
    laughs_t = PROTO2 + tensor("0", 4, [4], [1]) + long_put(0) + b"0"
    for i in range(1, 61):
        laughs_t += b"(" + long_get(i - 1) + long_get(i - 1) + b"l" + long_put(i) + b"0"
    write("billion_laughs_tensor_leaves.pt", torch_zip(laughs_t + b"}" + ustr("w") + long_get(60) + b"s" + STOP, [("0", bytes(16))]),
          "limit", "one tensor reachable through 2^60 paths: 2^60 output names", kind="limit")
    write("self_referencing_list.pt", PROTO2 + b"]" + long_put(0) + long_get(0) + b"a" + STOP,
          ["no tensors", "limit", "depth", "nested deeper", "cycle"], "a list that contains itself", kind="limit")

    # --- tensor metadata that lies about the storage ---------------------------------------------------
    def one_tensor(t, storages):
        return torch_zip(PROTO2 + b"}" + ustr("w") + t + b"s" + STOP, storages)
    write("view_out_of_bounds.pt", one_tensor(tensor("0", 4, [1000], [1]), [("0", bytes(16))]),
          ["bounds", "exceeds", "storage"], "view of 1000 elements over a 4-element storage", kind="tensor")
    write("view_offset_overflow.pt", one_tensor(tensor("0", 4, [2], [2**62], offset=2**62), [("0", bytes(16))]),
          ["overflow", "bounds", "exceeds", "storage"], "offset + stride*size overflows u64", kind="tensor")
    write("storage_missing.pt", one_tensor(tensor("7", 4, [4], [1]), [("0", bytes(16))]),
          ["missing", "not found", "data/7"], "persistent id names a storage the zip does not hold", kind="tensor")
    write("storage_numel_lies.pt", one_tensor(tensor("0", 1 << 40, [1 << 40], [1]), [("0", bytes(16))]),
          ["bounds", "exceeds", "storage", "truncated", "size"], "storage claims 2^40 elements (4 TiB) but holds 16 bytes", kind="tensor")
    write("negative_size.pt", one_tensor(tensor("0", 4, [-4], [1]), [("0", bytes(16))]),
          ["negative", "shape", "size"], "negative dimension", kind="pickle")

    write("shape_product_overflow.pt", one_tensor(tensor("0", 4, [1 << 31, 1 << 31, 1 << 31], [0, 0, 0]), [("0", bytes(16))]),
          ["overflow", "too many", "exceeds", "limit"], "shape 2^31 x 2^31 x 2^31 with zero strides: numel overflows u64", kind="tensor")
    write("negative_stride.pt", one_tensor(tensor("0", 4, [4], [-1], offset=3), [("0", bytes(16))]),
          ["negative", "stride"], "a negative stride (torch never stores one; a reader that trusts it indexes backwards)", kind="pickle")

    zip_structure(good)
    legacy_structure()
    names_and_scale()


def zip_structure(good):
    """Lying zip64 records, zip bombs and overlapping entries, and the real torch zip cut at each boundary."""
    eocd = good.rindex(b"PK\x05\x06")
    eocd64 = good.rindex(b"PK\x06\x06")
    locator = good.rindex(b"PK\x06\x07")
    # torch.save always writes a zip64 end record and locator; make each field lie in turn.
    for name, at, value, expect, why in (
        ("zip64_cd_offset_lies.pt", eocd64 + 48, 1 << 40, ["truncated", "past", "beyond", "zip"],
         "the zip64 end record puts the central directory at 1 TiB, in a file of a few KiB"),
        ("zip64_cd_size_lies.pt", eocd64 + 40, 1 << 62, ["truncated", "past", "beyond", "zip", "limit"],
         "the zip64 end record says the central directory is 2^62 bytes: reading it must not allocate that"),
        ("zip64_entry_count_lies.pt", eocd64 + 32, 1 << 40, ["entries", "zip", "limit", "count"],
         "the zip64 end record claims 2^40 entries: an index sized from it would allocate terabytes"),
        ("zip64_locator_past_eof.pt", locator + 8, 1 << 50, ["truncated", "past", "beyond", "zip", "zip64"],
         "the zip64 locator points its end record 1 PiB into the file"),
    ):
        bad = bytearray(good)
        struct.pack_into("<Q", bad, at, value)
        write(name, bytes(bad), expect, why, kind="zip")

    # A classic zip bomb: a deflated entry that would inflate to 1 GiB. torch.save never compresses, but a re-zipped
    # checkpoint is deflated, so such entries are read, within a ratio.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl", date_time=(1980, 1, 1, 0, 0, 0)),
                   PROTO2 + b"}" + ustr("w") + tensor("0", 1 << 28, [1 << 28], [1]) + b"s" + STOP)
        z.writestr(zipfile.ZipInfo("archive/byteorder", date_time=(1980, 1, 1, 0, 0, 0)), b"little")
        info = zipfile.ZipInfo("archive/data/0", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w") as f:
            zero = bytes(1 << 20)
            for _ in range(1024):
                f.write(zero)
    write("zip_bomb_deflate.pt", buf.getvalue(), ["zip bomb", "inflate"],
          "data/0 is a real deflated entry of 1 GiB of zeros in 1 MB (1028x): a deflated entry may declare at most 64x "
          "its compressed bytes plus 64 MiB, checked from its directory record before anything is inflated", kind="limit")

    # Overlapping entries (the non-recursive zip bomb): every storage's directory record points at one local header.
    pkl = PROTO2 + b"}" + b"".join(ustr(f"w{i}") + tensor(str(i), 1 << 10, [1 << 10], [1]) + b"s" for i in range(64)) + STOP
    zipped = bytearray(torch_zip(pkl, [(str(i), bytes(1 << 12)) for i in range(64)]))
    overlapped = overlap_entries(zipped)
    write("zip_overlapping_entries.pt", overlapped, ["overlap"],
          "64 directory records share one 4 KiB local entry: a reader that follows them writes 64x what it reads", kind="zip")
    # Two entries named data/0 with different bytes: which one a reader picks decides what it loads.
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, data in (("data.pkl", PROTO2 + b"}" + ustr("w") + tensor("0", 4, [4], [1]) + b"s" + STOP),
                               ("byteorder", b"little"), ("data/0", bytes(16)), ("data/0", b"\xff" * 16)):
                z.writestr(zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0)), data)
    write("zip_duplicate_entry.pt", buf.getvalue(), ["twice", "duplicate"],
          "two entries named archive/data/0 with different bytes", kind="zip")
    # Truncation at every structural boundary of the real file.
    z = zipfile.ZipFile(io.BytesIO(good))
    infos = z.infolist()
    cd = struct.unpack_from("<Q", good, eocd64 + 48)[0]
    data_pkl = infos[0]
    pkl_data = data_pkl.header_offset + 30 + len(data_pkl.filename) + len(data_pkl.extra)
    storage = next(i for i in infos if i.filename.endswith("data/0"))
    st_data = storage.header_offset + 30 + len(storage.filename) + len(storage.extra)
    cuts = {
        "in_local_header": 10,
        "after_local_header": pkl_data,
        "in_data_pkl": pkl_data + data_pkl.compress_size // 2,
        "after_data_pkl": infos[1].header_offset,
        "in_storage": st_data + storage.compress_size // 2,
        "at_central_dir": cd,
        "in_central_dir_record": cd + 20,
        "at_zip64_end_record": eocd64,
        "at_zip64_locator": locator,
        "at_end_record": eocd,
        "in_end_record": eocd + 11,
    }
    for what, at in cuts.items():
        write(f"truncated_zip_{what}.pt", good[:at], ["truncated", "end of", "not a torch", "zip"],
              f"the real torch.save zip cut at byte {at} of {len(good)} ({what.replace('_', ' ')})", kind="truncated")


def overlap_entries(zipped):
    """Points every data/N directory record at data/0's local header (sizes are equal), as overlap bombs do."""
    out = bytearray(zipped)
    z = zipfile.ZipFile(io.BytesIO(bytes(zipped)))
    first = next(i for i in z.infolist() if i.filename.endswith("data/0")).header_offset
    at = out.index(b"PK\x01\x02")
    while at >= 0:
        n = struct.unpack_from("<H", out, at + 28)[0]
        name = bytes(out[at + 46: at + 46 + n])
        if b"/data/" in name:
            struct.pack_into("<I", out, at + 42, first)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def legacy_structure():
    """torch's legacy (pre-1.6) format: five pickles and the raw storages; cut at each boundary."""
    g = torch.Generator().manual_seed(1)
    buf = io.BytesIO()
    torch.save({f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(3)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    import pickletools
    ends, at = [], 0
    for _ in range(4):  # magic number, protocol, sys info, the object; then the storage-key list
        for op, arg, pos in pickletools.genops(io.BytesIO(raw[at:])):
            if op.name == "STOP":
                at += pos + 1
                break
        ends.append(at)
    for op, arg, pos in pickletools.genops(io.BytesIO(raw[at:])):
        if op.name == "STOP":
            keys_end = at + pos + 1
            break
    cuts = {
        "in_magic": 3,
        "in_sys_info": (ends[1] + ends[2]) // 2,
        "in_object": (ends[2] + ends[3]) // 2,
        "before_storage_keys": ends[3],
        "in_storage_keys": (ends[3] + keys_end) // 2,
        "in_storage_size": keys_end + 4,
        "in_first_storage": keys_end + 8 + 100,
    }
    for what, cut in cuts.items():
        write(f"truncated_legacy_{what}.pt", raw[:cut], ["truncated", "end of", "not a torch"],
              f"torch's legacy format cut at byte {cut} of {len(raw)} ({what.replace('_', ' ')})", kind="truncated")


def names_and_scale():
    # A tensor name that is not UTF-8: BINUNICODE must hold UTF-8 (Python's unpickler raises on this too).
    bad_key = b"X" + struct.pack("<I", 3) + b"w\xff\xfe"
    write("name_not_utf8_pickle.pt", torch_zip(PROTO2 + b"}" + bad_key + tensor("0", 4, [4], [1]) + b"s" + STOP, [("0", bytes(16))]),
          ["utf-8", "utf8"], "a dict key whose BINUNICODE bytes are not UTF-8", kind="pickle")
    # A storage entry whose zip name is not UTF-8 (flag bit 11 set, so the name claims to be UTF-8).
    zipped = bytearray(torch_zip(PROTO2 + b"}" + ustr("w") + tensor("0", 4, [4], [1]) + b"s" + STOP, [("0", bytes(16))]))
    for sig, flag_at, name_len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        at = zipped.find(sig)
        while at >= 0:
            n = struct.unpack_from("<H", zipped, name_len_at + at)[0]
            if bytes(zipped[at + name_at: at + name_at + n]).endswith(b"data/0"):
                zipped[at + name_at + n - 1] = 0xFF
                struct.pack_into("<H", zipped, at + flag_at, struct.unpack_from("<H", zipped, at + flag_at)[0] | 0x800)
            at = zipped.find(sig, at + 4)
    write("name_not_utf8_zip_entry.pt", bytes(zipped), ["utf-8", "utf8", "data/0", "missing", "not found"],
          "the storage entry's zip name ends in byte 0xFF although its UTF-8 flag is set", kind="zip")
    # 10,000 real tensors, the last one under a nested key that collides with the first one's dotted name.
    g = torch.Generator().manual_seed(2)
    sd = {f"layers.{i}.weight": torch.randn(2, generator=g) for i in range(10_000)}
    sd["layers"] = {"0": {"weight": torch.zeros(3)}}
    write("ten_thousand_tensors_name_collision.pt", real_torch_save(sd), ["collides", "two tensors", "duplicate"],
          "a real torch.save of 10,001 tensors where a nested dict's path equals the first flat key: caught, not overwritten", kind="tensor")
    # Self-multiplying files, written by torch.save itself: views that repeat the same stored bytes.
    write("stride0_expand_bomb.pt", real_torch_save({f"w{i}": torch.zeros(1).expand(2**27) for i in range(64)}),
          ["self-multiplying", "repeat the same stored bytes"],
          "64 tensors of 2^27 floats, each torch.zeros(1).expand(2**27) (stride 0 over one stored float): 18 kB "
          "that would write 32 GiB", kind="limit")
    shared = torch.zeros(2**18)
    write("one_storage_many_names.pt", real_torch_save({f"w{i}": shared for i in range(5000)}),
          ["self-multiplying", "repeat the same stored bytes"],
          "one 1 MiB tensor under 5,000 names (torch.save stores it once): 1 MiB that would write 5.2 GB", kind="limit")


def _finish():
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(EXPECTED.items())]  # one line per file: easy diffs
    (OUT / "expected.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"{len(EXPECTED) - 1} hostile files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
    _finish()
