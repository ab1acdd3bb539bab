"""No parser differentials (issue #16): every input of tests/hostile/differential.py is refused, and Python shows
why.

Owns: tests/e2e/test_differential.py. For each case, built at test time from real torch.save / pickle / tarfile /
zipfile / dcp.save output: ckptconv exits 1 with one `error[KIND]:` line that names the file and says what is
ambiguous, writes nothing and runs nothing; then the case's demo script shows, in a subprocess in the same
folder, what Python or torch reads from the same bytes (and, for the payload cases, that torch.load runs the
hidden reading: its marker file appears). Real protocol-4 and -5 pickles (frames, large byte strings written
unframed) still convert.
"""

import io
import pickletools
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import INDEX, assert_same, expected_tensors, load_output

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))
import differential  # noqa: E402

CASES = differential.cases()
ERROR_LINE = re.compile(r"^ckptconv: error\[([a-z-]+)\]: (.*)$", re.M)


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)
    assert sum(bool(c.marker) for c in CASES) >= 3  # payloads live under torch.load for frames and the tar polyglot


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_differential_refused(binary, tmp_path, case):
    path = case.build(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([binary, "convert", str(path), str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, f"{case.name} ({case.why}): exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "panicked" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = ERROR_LINE.findall(r.stderr)
    assert len(lines) == 1, f"expected one error line:\n{r.stderr}"
    kind, message = lines[0]
    assert kind == case.kind, f"{case.name}: error kind {kind}, expected {case.kind} ({case.why}):\n{r.stderr}"
    assert case.name in message, f"the message does not name the file:\n{message}"
    bare = message.replace(str(path), "").lower()
    assert any(s in bare for s in case.expect), f"expected one of {case.expect} ({case.why}) in:\n{message}"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], "output left behind"
    if case.marker:
        assert not (tmp_path / case.marker).exists(), "ckptconv ran the payload"
    # What Python and torch read from the same bytes.
    demo = subprocess.run([sys.executable, "-c", differential.DEMO_PRELUDE + case.demo, path.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, f"{case.name}: the demo's facts do not hold:\n{demo.stderr[-3000:]}"
    if case.marker:
        assert (tmp_path / case.marker).exists(), "the demo did not show the hidden reading live"
    assert not (tmp_path / "marker_never").exists()


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_framed_pickles_still_convert(run, tmp_path, protocol, legacy):
    """torch.save with pickle_protocol 4 and 5: every pickle is framed; 300 tensors and their names make the
    object pickle several frames, and a 100 KiB byte string and a 70,000-character string are written unframed
    between them. (torch's weights_only unpickler has no FRAME opcode, so torch.load reads them with
    weights_only=False: the file is our own.)"""
    g = torch.Generator().manual_seed(protocol)
    sd = {f"layers.{i}.weight": torch.randn(3, 2, generator=g) for i in range(300)}
    obj = {"model": sd, "blob": b"\x01" * (100 << 10), "note": "n" * 70000, "step": 12}
    src = tmp_path / "framed.pt"
    torch.save(obj, src, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    if legacy:
        ops = list(pickletools.genops(io.BytesIO(src.read_bytes()[differential._pickle_ends(src.read_bytes(), 3)[-1]:])))
    else:
        ops = list(pickletools.genops(zipfile.ZipFile(src).read("framed/data.pkl")))
    frames = [pos for op, _, pos in ops if op.name == "FRAME"]
    big = [pos for op, arg, pos in ops if op.name in ("BINBYTES", "BINUNICODE") and len(arg) > 65536]
    assert len(frames) >= 2 and len(big) == 2, (frames, big)
    out = tmp_path / "out"
    r = run("convert", src, out)
    assert r.returncode == 0, r.stderr
    assert not (out / INDEX).exists()
    assert_same(load_output(out), expected_tensors(torch.load(src, weights_only=False)), f"protocol {protocol}")
