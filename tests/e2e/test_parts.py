"""Scale-out parts (issue 20): `convert --part I/N` run as separate processes in any order, then `--finish`, give
the bytes one `convert` gives, for every input kind; `--jobs J` too. A finishing step refuses, naming the shards,
when a part has not run; a part killed mid-write (SIGKILL) leaves no file with a final name.

Owns: tests/e2e/test_parts.py. The reference is one plain run of the same binary on the same input (that run's
own correctness against torch, megatron-core and transformers is what the other e2e modules test). Under
`npx ckptconv` (the CLI as WASI under Node) the same cases run; `--jobs` above 1 is refused there (no threads).
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FX = REPO / "tests" / "fixtures"
MG = FX / "megatron" / "qwen2_tp2_pp2"
MOE = FX / "megatron_moe" / "qwen3moe_ep2_tp2"
LORA = FX / "lora"


def convert(src, *flags):
    return lambda out: ["convert", src, out, *flags]


# name -> (out folder -> argv); most split into several data files (an adapter and a torch.save file are one).
CASES = {
    "pt": convert(FX / "pt" / "qwen2_tiny_full_weights.pt", "--max-shard-size", "40KB"),
    "dcp": convert(FX / "dcp" / "fsdp2_ws2" / "global_step_1", "--max-shard-size", "40KB"),
    "megatron": lambda out: ["mg2hf", MG / "actor", out, MG / "base_hf", "--max-shard-size", "20KB"],
    "megatron_torch_dist": lambda out: ["mg2hf", MG / "actor_dist", out, MG / "base_hf", "--max-shard-size", "20KB"],
    "megatron_moe": lambda out: ["mg2hf", MOE / "actor", out, MOE / "base_hf", "--max-shard-size", "20KB"],
    "verl": convert(FX / "verl" / "fsdp2_ws2" / "actor", "--max-shard-size", "20KB"),
    "deepspeed_zero3": convert(FX / "deepspeed" / "zero3_bf16_w3" / "ckpt", "--max-shard-size", "20KB"),
    "hf_bin_set": convert(FX / "hf_sets" / "qwen2_bin_sharded", "--max-shard-size", "20KB", "--dtype", "bf16"),
    "lora_adapter": convert(LORA / "full_weights.pt", "--base", LORA / "base_qwen2", "--lora", "adapter"),
    "save_helpers": convert(LORA / "openvla_toy" / "full_weights.pt", "--base", LORA / "openvla_toy" / "base",
                            "--model-type", "openvla_oft", "--use-film", "--use-proprio"),
    "torch_save": convert(FX / "pt" / "qwen2_tiny_full_weights.pt", "--format", "pt"),
    "dcp_to_pt": lambda out: ["dcp-to-pt", "--dcp_path", FX / "dcp" / "fsdp2_ws2" / "global_step_1",
                              "--output_path", Path(out) / "full_weights.pt"],
}


def ckpt(binary, *args, check=True):
    r = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args))} -> {r.returncode}\n{r.stderr[-3000:]}"
    return r


def tree(folder):
    """Every file under `folder` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def plan_parts(binary, argv, n):
    return json.loads(ckpt(binary, *argv, "--plan-parts", n).stdout)


@pytest.fixture(scope="module")
def reference(binary, tmp_path_factory):
    """case -> the files one plain run writes (once per module)."""
    cache = {}

    def get(case):
        if case not in cache:
            out = tmp_path_factory.mktemp(f"ref_{case}")
            ckpt(binary, *CASES[case](out), "--quiet")
            cache[case] = tree(out)
        return cache[case]
    return get


def run_parts(binary, argv, n, seed):
    """Runs parts 1..n of `argv` one after the other in a shuffled order; returns that order."""
    order = list(range(1, n + 1))
    random.Random(seed).shuffle(order)
    for i in order:
        ckpt(binary, *argv, "--part", f"{i}/{n}", "--quiet")
    return order


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("case", ["pt", "dcp", "megatron"])
def test_parts_in_any_order_equal_one_run(binary, reference, tmp_path, case, n):
    argv = CASES[case](tmp_path)
    split = plan_parts(binary, argv, n)
    data = [f["name"] for g in split["groups"] for f in g["files"]]
    assert len(data) >= 8, f"{case}: want at least 8 shards to split, the plan has {len(data)}"
    assert sorted(data) == sorted(set(data)), "a data file in two parts"
    order = run_parts(binary, argv, n, seed=n)
    # Every part ran: each data file is there, nothing that makes the folder look finished is.
    written = tree(tmp_path)
    assert sorted(k for k in written if not k.startswith(".")) == sorted(data), order
    for f in split["finishing"]:
        assert f["name"] not in written, f"{f['name']} written before --finish (order {order})"
    ckpt(binary, *argv, "--finish", "--quiet")
    assert tree(tmp_path) == reference(case), f"{case} with {n} parts in order {order} differs from one run"


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("pt", "dcp", "megatron")])
def test_every_input_kind_splits(binary, reference, tmp_path, case):
    argv = CASES[case](tmp_path)
    run_parts(binary, argv, 3, seed=7)
    ckpt(binary, *argv, "--finish", "--quiet")
    assert tree(tmp_path) == reference(case)


def test_parts_running_at_once(binary, reference, tmp_path):
    argv = [str(a) for a in CASES["megatron"](tmp_path)]
    procs = [subprocess.Popen([binary, *argv, "--part", f"{i}/3", "--quiet"], stderr=subprocess.PIPE, text=True)
             for i in (2, 3, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ckpt(binary, *argv, "--finish", "--quiet")
    assert tree(tmp_path) == reference("megatron")


def test_finish_names_missing_and_short_shards(binary, tmp_path):
    argv = CASES["pt"](tmp_path)
    split = plan_parts(binary, argv, 3)
    for i in (1, 3):
        ckpt(binary, *argv, "--part", f"{i}/3", "--quiet")
    r = ckpt(binary, *argv, "--finish", check=False)
    assert r.returncode == 1, r.stderr
    missing = [f["name"] for f in split["groups"][1]["files"]]
    assert f"error[output]: {tmp_path}:" in r.stderr
    for name in missing:
        assert f"{name} is missing" in r.stderr, r.stderr
    assert "has every part run?" in r.stderr
    assert not any(Path(tmp_path, f["name"]).exists() for f in split["finishing"]), "finishing files written"
    # All parts, but one shard cut short.
    ckpt(binary, *argv, "--part", "2/3", "--quiet")
    short = Path(tmp_path, missing[0])
    size = short.stat().st_size
    with open(short, "r+b") as f:
        f.truncate(size - 1)
    r = ckpt(binary, *argv, "--finish", check=False)
    assert r.returncode == 1 and f"{missing[0]} has {size - 1} bytes, the plan says {size}" in r.stderr, r.stderr
    assert not any(Path(tmp_path, f["name"]).exists() for f in split["finishing"])


def test_parts_refuse_what_exists(binary, tmp_path):
    argv = CASES["pt"](tmp_path)
    ckpt(binary, *argv, "--part", "1/3", "--quiet")
    r = ckpt(binary, *argv, "--part", "1/3", check=False)
    assert r.returncode == 1 and "already exists; pass --force to overwrite" in r.stderr, r.stderr
    ckpt(binary, *argv, "--part", "1/3", "--force", "--quiet")
    # A part into a folder holding a finished conversion is refused too (it would look finished while changing).
    done = tmp_path / "done"
    ckpt(binary, *CASES["pt"](done), "--quiet")
    r = ckpt(binary, *CASES["pt"](done), "--part", "3/3", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    # With --force (a rerun, a requeued Slurm task), the earlier index goes first: nothing looks finished until
    # --finish, even if another part then fails.
    r = ckpt(binary, *CASES["pt"](done), "--part", "3/3", "--force")
    assert "model.safetensors.index.json" in r.stderr and not (done / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("bad", [["--part", "0/3"], ["--part", "4/3"], ["--part", "1/0"], ["--part", "x"],
                                 ["--part", "1/3", "--finish"], ["--jobs", "0"], ["--plan-parts", "0"]])
def test_bad_part_flags_are_usage_errors(binary, tmp_path, bad):
    r = ckpt(binary, *CASES["pt"](tmp_path), *bad, check=False)
    assert r.returncode == 2, r.stderr
    assert not any(tmp_path.iterdir())


def test_a_part_with_nothing_to_write(binary, reference, tmp_path):
    argv = CASES["torch_save"](tmp_path)
    r = ckpt(binary, *argv, "--part", "2/3")
    assert "part 2/3 has nothing to write" in r.stderr
    assert not any(tmp_path.iterdir())
    run_parts(binary, argv, 3, seed=1)
    ckpt(binary, *argv, "--finish", "--quiet")
    assert tree(tmp_path) == reference("torch_save")


def under_node(binary):
    return Path(binary).read_bytes()[:2] == b"#!"


@pytest.mark.parametrize("case", ["pt", "megatron", "save_helpers"])
@pytest.mark.parametrize("jobs", [2, 4])
def test_jobs_equal_one_run(binary, reference, tmp_path, case, jobs):
    r = ckpt(binary, *CASES[case](tmp_path), "--jobs", jobs, "--quiet", check=False)
    if under_node(binary):
        assert r.returncode == 1 and "--jobs above 1 needs threads" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path) == reference(case)
    # Within a part as well.
    other = tmp_path / "parts"
    for i in (2, 1):
        ckpt(binary, *CASES[case](other), "--part", f"{i}/2", "--jobs", jobs, "--quiet")
    ckpt(binary, *CASES[case](other), "--finish", "--quiet")
    assert tree(other) == reference(case)


def test_a_failing_job_stops_and_leaves_nothing(binary, tmp_path):
    """One job cannot create its temp file (a folder has its name): the run fails naming it, the other jobs stop,
    and no file has a final name."""
    if under_node(binary):
        pytest.skip("--jobs needs threads (refused under WASI, tested above)")
    argv = CASES["pt"](tmp_path)
    name = plan_parts(binary, argv, 1)["groups"][0]["files"][-1]["name"]
    blocker = tmp_path / f".{name}.ckptconv-partial"
    blocker.mkdir()
    r = ckpt(binary, *argv, "--jobs", 4, check=False)
    assert r.returncode == 1 and f".{name}.ckptconv-partial" in r.stderr, r.stderr
    assert "stopped" not in r.stderr, "the error shown is a stopped job's, not the cause"
    assert [p.name for p in tmp_path.iterdir()] == [blocker.name]


# --- a part killed mid-write ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_pt(tmp_path_factory):
    """A ~96 MB .pt of 12 bf16 tensors, written by torch.save: shards big enough to stop a part mid-write."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(2048, 2048, generator=g).to(torch.bfloat16) for i in range(12)}, path)
    return path


def kill_mid_write(cmd, partial, final_names, tries=10):
    """Runs `cmd` and SIGKILLs it while it writes `partial` (stopped first with SIGSTOP, so what is on disk at that
    moment is seen); retries when the run finished before it could be stopped. Returns (partial size, final names
    present) at the moment of the kill."""
    for _ in range(tries):
        for f in final_names:
            Path(f).unlink(missing_ok=True)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while p.poll() is None and time.monotonic() < deadline:
                if partial.exists() and partial.stat().st_size > 0:
                    p.send_signal(signal.SIGSTOP)
                    size = partial.stat().st_size
                    present = [f for f in final_names if Path(f).exists()]
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    return size, present
                time.sleep(0.0005)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    pytest.fail(f"{cmd} always finished before it could be stopped mid-write")


def test_part_killed_mid_write_leaves_no_final_name(binary, big_pt, tmp_path):
    flags = ["--max-shard-size", "20MB"]
    ref = tmp_path / "ref"
    ckpt(binary, "convert", big_pt, ref, *flags, "--quiet")
    out = tmp_path / "out"
    argv = ["convert", big_pt, out, *flags]
    split = plan_parts(binary, argv, 2)
    files = split["groups"][0]["files"]
    assert len(files) >= 2
    # Stop part 1 while it writes its last file: the ones before it are complete but not yet renamed.
    last = files[-1]
    partial = out / f".{last['name']}.ckptconv-partial"
    size, present = kill_mid_write([binary, *map(str, argv), "--part", "1/2", "--quiet"], partial,
                                   [out / f["name"] for f in files])
    assert 0 < size < last["size"], f"not stopped mid-write: {size} of {last['size']} bytes"
    assert present == [], f"final names while part 1 was still writing: {present}"
    assert not any(p.name == f["name"] for p in out.iterdir() for f in files), "a final name after the kill"
    ckpt(binary, *argv, "--part", "2/2", "--quiet")
    r = ckpt(binary, *argv, "--finish", check=False)
    assert r.returncode == 1 and all(f"{f['name']} is missing" in r.stderr for f in files), r.stderr
    # The part run again (as Ray or Slurm would) overwrites its leftovers; then the folder equals one run.
    ckpt(binary, *argv, "--part", "1/2", "--force", "--quiet")
    ckpt(binary, *argv, "--finish", "--quiet")
    assert tree(out) == tree(ref)
