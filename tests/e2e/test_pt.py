"""End-to-end tests of `ckptconv convert/inspect` on torch.save files.

Owns: tests/e2e/test_pt.py. Every expectation comes from torch reading the same input file (never from
hard-coded values): names by the naming/prefix rule in conftest, dtypes, shapes and exact bytes.
Run: .venv/bin/python -m pytest tests/e2e [--skip-slow]
"""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, INDEX, assert_same, expected_tensors, load_output, read_header, shard_files, tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))
import terminal  # noqa: E402  (tests/hostile/terminal.py: how names are shown)

PT_FILES = sorted((FIXTURES / "pt").glob("*.pt")) + [FIXTURES / "sample" / "full_weights.pt"]
HOSTILE = FIXTURES.parent / "hostile"
DTYPE_FLAGS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASTABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16}  # float8 is kept as is
QWEN_PT = FIXTURES / "pt" / "qwen2_tiny_full_weights.pt"
QWEN_HF = FIXTURES / "hf" / "qwen2_tiny"


def ident(p):
    return p.relative_to(FIXTURES).as_posix()


def load(path):
    return torch.load(path, weights_only=False, map_location="cpu")


def convert_ok(run, src, out, *flags, timeout=120):
    r = run("convert", src, out, *flags, timeout=timeout)
    assert r.returncode == 0, f"convert {src} {' '.join(flags)} failed ({r.returncode}):\n{r.stderr}"
    return r


def assert_clean_output_dir(out):
    """Only the announced outputs: no temp or partial files left behind."""
    names = {p.name for p in Path(out).iterdir()}
    announced = {p.name for p in shard_files(out)} | ({INDEX} if (Path(out) / INDEX).exists() else set())
    assert names == announced, f"unexpected files in output: {sorted(names - announced)}"


@pytest.mark.parametrize("src", PT_FILES, ids=ident)
def test_convert_matches_torch(run, tmp_path, src):
    convert_ok(run, src, tmp_path)
    assert_clean_output_dir(tmp_path)
    assert_same(load_output(tmp_path), expected_tensors(load(src)), src.name)
    for f in shard_files(tmp_path):
        with safe_open(f, "pt") as s:
            assert s.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", ["lightning_style.pt", "model_optimizer_args.pt", "prefix_order.pt", "nested_containers.pt"])
def test_prefix_empty_converts_everything(run, tmp_path, name):
    src = FIXTURES / "pt" / name
    convert_ok(run, src, tmp_path, "--prefix", "")
    assert_same(load_output(tmp_path), expected_tensors(load(src), prefix=""), name)


@pytest.mark.parametrize("name,prefix", [("lightning_style.pt", "state_dict"), ("prefix_order.pt", "module"),
                                         ("model_optimizer_args.pt", "optimizer"), ("lightning_style.pt", "state_dict.net"),
                                         ("nested_containers.pt", "a.b")])
def test_prefix_explicit(run, tmp_path, name, prefix):
    src = FIXTURES / "pt" / name
    convert_ok(run, src, tmp_path, "--prefix", prefix)
    assert_same(load_output(tmp_path), expected_tensors(load(src), prefix=prefix), f"{name} --prefix {prefix}")


@pytest.mark.parametrize("src", PT_FILES, ids=ident)
def test_inspect_lists_format_and_tensors(run, src):
    r = run("inspect", src)
    assert r.returncode == 0, r.stderr
    assert ("zip" if zipfile.is_zipfile(src) else "legacy") in r.stdout.lower(), "inspect does not name the format"
    # Names are listed as a terminal may show them: tab\tnewline\n as tab\x09newline\x0a (issue #16).
    missing = [k for k in expected_tensors(load(src)) if terminal.escaped(k) not in r.stdout]
    assert not missing, f"inspect does not list {missing[:5]}"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "no_extension"])
def test_any_file_name(run, tmp_path, name):
    """Detection is by content; the zip's inner root keeps the original stem, not the new file name."""
    src = tmp_path / name
    shutil.copy(FIXTURES / "pt" / "view_slices.pt", src)
    convert_ok(run, src, tmp_path / "out")
    assert_same(load_output(tmp_path / "out"), expected_tensors(load(src)), name)


def rezip(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))


def test_big_endian_swapped_or_refused(run, tmp_path):
    """A byteorder=big file must be byte-swapped (matching torch, which swaps on load) or refused clearly."""
    g = torch.Generator().manual_seed(8)
    tensors = {"f64": torch.randn(3, generator=g, dtype=torch.float64), "f32": torch.randn(2, 3, generator=g),
               "f16": torch.randn(4, generator=g).half(), "bf16": torch.randn(4, generator=g).bfloat16(),
               "i64": torch.arange(-2, 3), "i16": torch.arange(5, dtype=torch.int16), "u8": torch.arange(6, dtype=torch.uint8)}
    le, be = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(tensors, le)  # one storage per tensor, keys "0".. in dict order
    sizes = [t.element_size() for t in tensors.values()]

    def swap(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name and "/.data/" not in name:
            size = sizes[int(name.rsplit("/", 1)[1])]
            return b"".join(data[i:i + size][::-1] for i in range(0, len(data), size))
        return data
    rezip(le, be, swap)
    want = load(be)
    assert_same(want, tensors, "torch's own reading of the big-endian file")  # the file is what we think

    r = run("convert", be, tmp_path / "out")
    if r.returncode == 0:
        assert_same(load_output(tmp_path / "out"), want, "big-endian")
    else:
        assert r.returncode == 1 and "panicked" not in r.stderr, r.stderr
        assert any(w in r.stderr.lower() for w in ("endian", "byteorder", "byte order")), r.stderr


@pytest.mark.parametrize("dtype,word", [(torch.complex64, "complex"), (torch.uint16, "uint16")], ids=str)
def test_unsupported_dtype_is_a_clear_error(run, tmp_path, dtype, word):
    """Dropping a weight silently would be worse than failing. complex has no safetensors dtype: exit 1 naming
    it. uint16 does exist in safetensors (U16), so converting it exactly is also accepted."""
    src = tmp_path / "x.pt"
    torch.save({"ok": torch.ones(2), "odd": torch.arange(3).to(dtype)}, src)
    out = tmp_path / "out"
    r = run("convert", src, out)
    if r.returncode == 0 and dtype == torch.uint16:
        assert_same(load_output(out), expected_tensors(load(src)), "uint16")
        return
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stderr}"
    assert word in r.stderr.lower() and "panicked" not in r.stderr, r.stderr
    assert not (out.exists() and list(out.glob("*.safetensors")))


def test_dtype_keep_is_default(run, tmp_path):
    src = FIXTURES / "pt" / "dtypes_all.pt"
    convert_ok(run, src, tmp_path / "a")
    convert_ok(run, src, tmp_path / "b", "--dtype", "keep")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flag", DTYPE_FLAGS)
@pytest.mark.parametrize("name", ["dtypes_all.pt", "legacy_format.pt", "view_slices.pt", "view_transposed.pt"])
def test_dtype_cast_matches_torch(run, tmp_path, name, flag):
    src = FIXTURES / "pt" / name
    convert_ok(run, src, tmp_path, "--dtype", flag)
    got = load_output(tmp_path)
    want = {k: (v.to(DTYPE_FLAGS[flag]) if v.dtype in CASTABLE else v) for k, v in expected_tensors(load(src)).items()}
    # NaN bits are not compared: torch's own NaN pattern depends on its code path (the AVX2 bf16 kernel
    # writes 0xFFFF, the scalar one 0x7FC0), so only "is NaN" is meaningful. Everything else is bitwise.
    nan_free = {}
    for k, w in want.items():
        if w.dtype in CASTABLE and w.dtype.is_floating_point and w.numel():
            g = got[k]
            assert g.dtype == w.dtype, f"{k}: dtype {g.dtype} != {w.dtype}"
            assert torch.equal(torch.isnan(g.float()), torch.isnan(w.float())), f"{k}: NaN positions differ"
            w = torch.where(torch.isnan(w), torch.zeros((), dtype=w.dtype), w)
            got[k] = torch.where(torch.isnan(g), torch.zeros((), dtype=g.dtype), g)
        nan_free[k] = w
    assert_same(got, nan_free, f"{name} --dtype {flag}")


def test_sharding_qwen2_and_transformers_loads_it(run, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

    out = tmp_path / "out"
    limit = 20_000  # "20KB": HF units, KB = 1000
    convert_ok(run, QWEN_PT, out, "--max-shard-size", "20KB")
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert_clean_output_dir(out)
    want = expected_tensors(load(QWEN_PT))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert_shards_within(out, limit)
    assert_same(load_output(out), want, "qwen2 sharded")

    shutil.copy(QWEN_HF / "config.json", out / "config.json")
    ids = torch.arange(24).reshape(2, 12) * 5 % 128
    ref = Qwen2ForCausalLM(AutoConfig.from_pretrained(QWEN_HF)).eval()
    ref.load_state_dict(load(QWEN_PT))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5


def assert_shards_within(out, limit):
    """Every shard FILE (header included) is within the limit unless it holds one tensor larger than it."""
    for f in shard_files(out):
        header, _ = read_header(f)
        header.pop("__metadata__", None)
        size = f.stat().st_size
        assert size <= limit or len(header) == 1, f"{f.name}: {size} bytes holding {len(header)} tensors > {limit}"


@pytest.mark.parametrize("flag,shards", [("10KB", 4), ("10KiB", 2), ("1GB", 1)])
def test_shard_size_units(run, tmp_path, flag, shards):
    """KB = 1000 (HF), KiB = 1024. Two 4948-byte tensors make a ~10.06 kB file (any header of 97..335
    bytes): too big for 10KB, fits 10KiB. A single shard is model.safetensors without an index."""
    limit = {"10KB": 10_000, "10KiB": 10_240, "1GB": 10**9}[flag]
    src = tmp_path / "units.pt"
    g = torch.Generator().manual_seed(6)
    torch.save({f"t{i}": torch.randn(1237, generator=g) for i in range(4)}, src)
    out = tmp_path / "out"
    convert_ok(run, src, out, "--max-shard-size", flag)
    files = shard_files(out)
    assert len(files) == shards, [f.name for f in files]
    assert (shards == 1) == (not (out / INDEX).exists()), "a single shard is model.safetensors without an index"
    assert_shards_within(out, limit)
    assert_same(load_output(out), expected_tensors(load(src)), flag)


@pytest.mark.parametrize("flags", [(), ("--max-shard-size", "20KB"), ("--dtype", "bf16")], ids=["single", "sharded", "bf16"])
def test_deterministic(run, tmp_path, flags):
    for d in ("a", "b"):
        convert_ok(run, QWEN_PT, tmp_path / d, *flags)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), f"{x.name} differs between runs"


# Every hostile input through `convert`: tests/e2e/test_hostile.py.

def test_hostile_inspect_refused(run):
    r = run("inspect", HOSTILE / "zip_os_system.pt", timeout=60, mem_limit=4 << 30)
    assert r.returncode == 1 and "os.system" in r.stderr and "panicked" not in r.stderr, r.stderr


def test_missing_input(run, tmp_path):
    missing = tmp_path / "does_not_exist.pt"
    r = run("convert", missing, tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert "does_not_exist.pt" in r.stderr


@pytest.mark.parametrize("args", [
    ("convert", "IN", "OUT", "--no-such-flag"),
    ("convert", "IN", "OUT", "--dtype", "int3"),
    ("convert",),
    ("no-such-command",),
])
def test_usage_errors_exit_2(run, tmp_path, args):
    src = FIXTURES / "pt" / "parameters.pt"
    args = [src if a == "IN" else tmp_path / "out" if a == "OUT" else a for a in args]
    r = run(*args)
    assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.stderr}"
    assert not (tmp_path / "out" / "model.safetensors").exists()


def sha256_chunks(chunks):
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


@pytest.mark.slow
def test_zip64_over_4gib(run, tmp_path):
    """A >4 GiB torch.save (zip64 records, a storage whose offset is >4 GiB) converts bit-exactly.

    The big tensor is mostly zeros with a distinct marked block every MiB (a pattern plus the block's index, so a
    misplaced or shifted range changes the hash); once torch has written it, its zero runs are punched into holes
    (`fallocate --dig-holes`), so the test needs ~4.3 GB of free disk at a time, not ~8.6 GB."""
    mib = 1 << 20
    blocks = 4104  # 4104 MiB > 4 GiB
    need = blocks * mib + (256 << 20)
    free = shutil.disk_usage(tmp_path).free
    assert free > need, f"test_zip64_over_4gib needs {need / 1e9:.1f} GB free in {tmp_path}, has {free / 1e9:.1f} GB"
    try:
        src = tmp_path / "big.pt"
        g = torch.Generator().manual_seed(5)
        pattern = torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)
        big = torch.zeros(blocks * mib, dtype=torch.uint8)
        v = big.view(blocks, mib)
        v[:, :4096] = pattern
        v[:, 4096:4104] = torch.arange(blocks, dtype=torch.int64).view(torch.uint8).view(blocks, 8)
        small = torch.randn(33, 7, generator=g)
        torch.save({"big": big, "small": small}, src)  # storages are written in order: small's lands past 4 GiB
        del big, v
        subprocess.run(["fallocate", "--dig-holes", str(src)], capture_output=True)  # best effort: only saves disk
        with zipfile.ZipFile(src) as z:
            offs = {i.filename.rsplit("/", 1)[-1]: i.header_offset for i in z.infolist() if "/data/" in i.filename}
        assert max(offs.values()) > 2**32, "fixture does not exercise zip64 offsets"

        out = tmp_path / "out"
        convert_ok(run, src, out, timeout=1800)  # ~9 GB of I/O at ~250 MB/s
        ref = torch.load(src, mmap=True, weights_only=True)
        step = 256 << 20
        flat = ref["big"].numpy()
        want = sha256_chunks(memoryview(flat[i:i + step]) for i in range(0, flat.size, step))

        f = out / "model.safetensors"
        header, base = read_header(f)
        assert header["big"]["dtype"] == "U8" and header["big"]["shape"] == [blocks * mib]
        start, end = header["big"]["data_offsets"]
        def file_chunks():
            with open(f, "rb") as fh:
                fh.seek(base + start)
                left = end - start
                while left:
                    c = fh.read(min(step, left))
                    assert c, "output shorter than its header says"
                    left -= len(c)
                    yield c
        assert sha256_chunks(file_chunks()) == want
        with safe_open(f, "pt") as s:
            assert tensor_bytes(s.get_tensor("small")) == tensor_bytes(ref["small"])
            assert s.get_tensor("small").dtype == torch.float32
        del ref, flat
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~9 GB: do not leave it for pytest's tmp retention
