"""Deflate-compressed torch.save zips (issue 16): a real torch.save re-zipped with Python's zipfile ZIP_DEFLATED, every
entry deflated (tests/deflated.py), converts bit-exactly to what torch.load(weights_only=True) reads, and to the same
bytes as the stored original; a deflated entry that lies about its size, fails its CRC-32 or has its stream cut
short is refused with one error naming the file and the entry, exit 1, nothing left behind; a storage larger than
the memory a run uses is inflated as it is read, never whole.

Owns: tests/e2e/test_deflate.py. Every file is made at test time by real torch.save and Python's zipfile.
"""

import io
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import INDEX, assert_same, expected_tensors, load_output, runtime_rss_kib
from test_hostile import ERROR_LINE, run_measured

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deflated  # noqa: E402  (tests/deflated.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return deflated.write_all(tmp_path_factory.mktemp("deflated"))


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_every_entry_is_deflated_and_torch_loads_it(files):
    with zipfile.ZipFile(files / "deflated.pt") as z:
        methods = {i.filename: i.compress_type for i in z.infolist()}
    assert "archive/data.pkl" in methods and "archive/byteorder" in methods, sorted(methods)
    assert set(methods.values()) == {zipfile.ZIP_DEFLATED}, methods
    got = torch.load(files / "deflated.pt", weights_only=True)
    want = torch.load(files / "original.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]) and got[k].stride() == want[k].stride(), k


def test_converts_bit_exactly_to_what_torch_reads(run, tmp_path, files):
    src = files / "deflated.pt"
    r = run("convert", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(tmp_path / "out"), expected_tensors(torch.load(src, weights_only=True)), src.name)
    r = run("inspect", src)
    assert r.returncode == 0, r.stderr
    assert "model.proj.weight" in r.stdout and "archive" in r.stdout, r.stdout


@pytest.mark.parametrize("flags", [[], ["--dtype", "bf16"], ["--max-shard-size", "10MB"], ["--format", "pt"]],
                         ids=["plain", "bf16", "shards", "format-pt"])
def test_same_bytes_as_the_stored_original(run, tmp_path, files, flags):
    """Inflating changes nothing: every output file equals the one converted from the stored original."""
    outs = {}
    for name in ("original.pt", "deflated.pt"):
        out = tmp_path / name
        r = run("convert", files / name, out, *flags)
        assert r.returncode == 0, r.stderr
        outs[name] = tree(out)
    assert outs["deflated.pt"] and outs["deflated.pt"] == outs["original.pt"], sorted(outs["deflated.pt"])


@pytest.mark.parametrize("file", sorted(deflated.BROKEN))
def test_broken_deflated_entry_refused(binary, tmp_path, files, file):
    suffix, why, phrase = deflated.BROKEN[file]
    out = tmp_path / "out"
    code, err, _ = run_measured([binary, "convert", files / file, out])
    assert code == 1, f"{file} ({why}): exit {code}:\n{err}"
    assert "panicked" not in err and "internal error" not in err, err
    lines = ERROR_LINE.findall(err)
    assert len(lines) == 1, f"expected one error line:\n{err}"
    kind, message = lines[0]
    assert kind == "zip", f"{file} ({why}): {err}"
    assert str(files / file) in message and f"entry 'archive/{suffix}'" in message, message
    assert phrase in message.lower(), f"{file} ({why}): expected '{phrase}' in:\n{message}"
    left = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert left == [], f"output left behind: {left}"
    assert not (out / INDEX).exists()


def test_large_deflated_storage_inflates_in_bounded_memory(binary, tmp_path):
    """One 160 MB storage, deflated: the run's peak RSS stays far below the storage (bands are read as the entry
    inflates, never the whole entry), and the output equals what torch reads."""
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(40_000_000, generator=g), "b": torch.randn(7, generator=g)}
    buf = io.BytesIO()
    torch.save(state, buf)
    src = tmp_path / "big_deflated.pt"
    src.write_bytes(deflated.rezip(buf.getvalue(), level=1))
    del buf
    code, err, rss = run_measured([binary, "convert", src, tmp_path / "out"], timeout=300)
    assert code == 0, err
    assert rss < (64 << 10) + runtime_rss_kib(binary), f"peak RSS {rss >> 10} MiB for a 160 MB deflated storage"
    assert_same(load_output(tmp_path / "out"), state, src.name)
