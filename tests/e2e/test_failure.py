"""Failure semantics: a killed or failing conversion never leaves output that looks complete, and a rerun works.

Owns: tests/e2e/test_failure.py. Inputs are written by real torch in the test's tmp dir.
- SIGKILL at random points during a conversion, 20 times: afterwards no final output name exists unless the
  whole output is there and checks out (a kill between renames can leave shards without their index, never an
  index without its shards), and a rerun with --force succeeds and equals an uninterrupted run.
- A small tmpfs that fills up: exit 1 with the OS's "No space left" named, no output file left, rerun elsewhere works;
  for a plain .pt and for a LoRA merge (whose workers write merged tensors positionally into the temp file).
"""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import INDEX

FINAL_SUFFIXES = (".safetensors", ".json")


@pytest.fixture(scope="module")
def big_pt(tmp_path_factory):
    """About 96 MB in 12 tensors, so a conversion takes long enough to be killed mid-write."""
    p = tmp_path_factory.mktemp("big") / "big.pt"
    g = torch.Generator().manual_seed(7)
    torch.save({f"layer.{i}.weight": torch.randn(1000, 2000, generator=g) for i in range(12)}, p)
    return p


@pytest.fixture(scope="module")
def big_lora_pt(tmp_path_factory):
    """About 50 MB of PEFT-named LoRA weights (as RLinf's torch.save of a PeftModel names them)."""
    p = tmp_path_factory.mktemp("big_lora") / "full_weights.pt"
    g = torch.Generator().manual_seed(8)
    sd = {}
    for i in range(6):
        m = f"base_model.model.layers.{i}.proj"
        sd[f"{m}.base_layer.weight"] = torch.randn(1000, 2000, generator=g)
        sd[f"{m}.lora_A.default.weight"] = torch.randn(8, 2000, generator=g)
        sd[f"{m}.lora_B.default.weight"] = torch.randn(1000, 8, generator=g)
    torch.save(sd, p)
    return p


def written_bytes(out):
    """Bytes in every file of `out` so far, temp files included."""
    try:
        return sum(f.stat().st_size for f in Path(out).iterdir())
    except FileNotFoundError:  # not created yet, or a temp file renamed between listing and stat
        return 0


def finals(out):
    return sorted(f.name for f in Path(out).iterdir() if not f.name.startswith(".")) if Path(out).exists() else []


def test_sigkill_never_leaves_a_complete_looking_output(binary, run, big_pt, tmp_path):
    ref = tmp_path / "ref"
    r = run("convert", big_pt, ref, "--max-shard-size", "20MB")
    assert r.returncode == 0, r.stderr
    want = {f: (ref / f).read_bytes() for f in finals(ref)}
    total = sum(len(b) for b in want.values())
    rng = random.Random(1234)
    killed = 0
    for i in range(20):
        out = tmp_path / f"run{i}"
        # Killed once a chosen share of the output bytes is on disk (temp names included): a point in the
        # conversion's progress, not in time, so the kill lands mid-way however fast or loaded the machine is.
        target = rng.uniform(0.02, 0.95) * total
        p = subprocess.Popen([binary, "convert", str(big_pt), str(out), "--max-shard-size", "20MB", "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and written_bytes(out) < target:
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        names = finals(out)
        if INDEX in names:
            # The index is renamed last: if it is there, every shard must be complete and identical.
            assert names == sorted(want), f"run {i}: index present but files are {names}"
            for f in names:
                assert (out / f).read_bytes() == want[f], f"run {i}: {f} differs"
        else:
            for f in names:
                assert f.endswith(".safetensors"), f"run {i}: unexpected {f}"
                assert (out / f).read_bytes() == want[f], f"run {i}: a published shard {f} is incomplete"
        r = subprocess.run([binary, "convert", str(big_pt), str(out), "--max-shard-size", "20MB", "--force", "--quiet"],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"run {i}: rerun failed: {r.stderr}"
        assert {f: (out / f).read_bytes() for f in finals(out)} == want, f"run {i}: rerun output differs"
    assert killed >= 10, f"only {killed} of 20 runs were still running when killed"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
@pytest.mark.parametrize("kind", ["plain", "lora-merge"])
def test_disk_full_is_a_clear_error_and_leaves_nothing(run, big_pt, big_lora_pt, tmp_path, kind):
    src, flags = (big_pt, ()) if kind == "plain" else (big_lora_pt, ("--lora", "merge"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        out = mnt / "out"
        r = run("convert", src, out, *flags)
        assert r.returncode == 1, r.stderr
        assert "no space left" in r.stderr.lower(), r.stderr
        assert "panicked" not in r.stderr
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert left == [], f"left behind on the full disk: {left}"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    r = run("convert", src, tmp_path / "roomy", *flags)
    assert r.returncode == 0, r.stderr
    assert finals(tmp_path / "roomy") == ["model.safetensors"]
