"""Scale-out conversions: the Ray driver (python/ckptconv_ray) and the Slurm recipe (scripts/slurm) against one plain
`ckptconv convert`, byte for byte.

Owns: tests/e2e/test_parts_ray.py. Shows that
  1. `python -m ckptconv_ray IN OUT --parts 3` gives the same files as one convert for a .pt, a DCP folder and a
     Megatron folder (each split into >= 8 shards; --verify reaches the finishing step), on a Ray cluster of 3 CPUs
     that this module starts once (on 127.0.0.1, no dashboard, no usage stats), on a local cluster the driver
     starts itself, and with the WASI module (env CKPTCONV_WASM, default target/wasi/ckptconv.wasm, run as
     wasi/runner.py says); a part with no files gets no task;
  2. a part whose ckptconv is SIGKILLed in the middle of writing a shard (a wrapper stops it once its partial file
     has bytes, checks nothing of the part looks finished, then kills it and itself) is run again by Ray, and the
     output is still identical;
  3. a part that exits 1 is not run again: the driver exits 1 naming the part and its error, leaves no index,
     config (not even an earlier run's, with --force) or partial file, and a run without --force refuses the shards
     already there; an address where
     no cluster listens fails at once;
  4. scripts/slurm: the array task run with bash for each SLURM_ARRAY_TASK_ID in shuffled order, then the finishing
     step, give the same files (finishing before every part has run fails); submit.sh queues the array and an
     afterok-dependent finish (a fake sbatch records its arguments).
Run: .venv/bin/python -m pytest tests/e2e/test_parts_ray.py
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, INDEX, REPO

sys.path.insert(0, str(REPO / "wasi"))
from runner import runner_prefix  # noqa: E402  (wasi/runner.py: the wasmtime CLI, or wasi/run.py on PyPI's wasmtime)

N = 3
SLURM = REPO / "scripts" / "slurm"
# Ray on loopback (node address 127.0.0.1), nothing reported anywhere, and token authentication (Ray's token file,
# ~/.ray/auth_token, made by the first cluster when missing): a driver given an address uses it only when told.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
MG = FIXTURES / "megatron" / "qwen2_tp2_pp2"
CASES = {  # name: (input, convert flags); each gives >= 8 shards
    "pt": (FIXTURES / "pt" / "qwen2_tiny_full_weights.pt", ["--max-shard-size", "40KB"]),
    "dcp": (FIXTURES / "dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint", ["--max-shard-size", "40KB"]),
    "megatron": (MG / "actor", ["--base", str(MG / "base_hf"), "--max-shard-size", "20KB"]),
}
HOLDER = """import ray, sys
ctx = ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[1])
print(ctx.address_info["address"], flush=True)
sys.stdin.read()  # until the test module closes stdin
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_address():
    """A Ray cluster of 3 CPUs for this module: held by a child process that stops it when its stdin closes. Its
    workers do not have python/ on their path (unless ckptconv_ray is installed): the task travels by value."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | RAY_ENV
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=temp, env=env)
    try:
        address = holder.stdout.readline().strip()
        assert address, f"the Ray cluster did not start (exit {holder.poll()})"
        yield address
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def drive(inp, out, flags, *, address=None, runner=(), timings=None):
    """`python -m ckptconv_ray IN OUT --parts 3 ...` from another folder -> CompletedProcess (text)."""
    cmd = [sys.executable, "-m", "ckptconv_ray", str(inp), str(out), "--parts", str(N), *runner, *flags]
    cmd += ["--address", address] if address else ["--num-cpus", "3"]
    cmd += ["--timings", str(timings)] if timings else []
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(REPO / "python")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(out).parent)


def convert_once(binary, inp, out, flags):
    r = subprocess.run([binary, "convert", str(inp), str(out), *flags, "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def plan(binary, inp, out, flags):
    r = subprocess.run([binary, "convert", str(inp), str(out), *flags, "--plan-parts", str(N)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_same_files(got, want):
    """The same names (hidden ones too) with the same bytes."""
    names = sorted(os.listdir(want))
    assert sorted(os.listdir(got)) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{name} differs"


def check_driver_run(binary, case, tmp_path, driver_flags=None, **kw):
    """The driver's output equals one convert's (>= 8 shards), every part ran once -> (CompletedProcess, timings)."""
    inp, flags = CASES[case]
    want = convert_once(binary, inp, tmp_path / "want", flags)
    assert len(list(want.glob("model-*.safetensors"))) >= 8
    r = drive(inp, tmp_path / "got", driver_flags or flags, timings=tmp_path / "timings.json", **kw)
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "got", want)
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert sorted(p["part"] for p in timings["per_part"]) == [1, 2, 3]
    assert all(p["attempts"] == 1 for p in timings["per_part"])
    return r, timings


# --- 1. the Ray driver gives one convert's files -----------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_parts_equal_one_convert(binary, case, ray_address, tmp_path):
    """--verify reaches the finishing step: every tensor compared with the input."""
    r, _ = check_driver_run(binary, case, tmp_path, address=ray_address, runner=["--ckptconv", binary, "--verify"])
    assert "every byte compared with the input" in r.stderr, r.stderr
    assert all(f"part {i}/{N}: " in r.stderr for i in (1, 2, 3)), r.stderr


def test_ray_launches_no_task_for_an_empty_part(binary, ray_address, tmp_path):
    """One model.safetensors for 3 parts: parts 2 and 3 have nothing to write and get no task."""
    inp, flags = MG / "actor", ["--base", str(MG / "base_hf")]
    want = convert_once(binary, inp, tmp_path / "want", flags)
    r = drive(inp, tmp_path / "got", flags, address=ray_address, runner=["--ckptconv", binary],
              timings=tmp_path / "timings.json")
    assert r.returncode == 0, r.stderr
    assert [p["part"] for p in json.loads((tmp_path / "timings.json").read_text())["per_part"]] == [1]
    assert_same_files(tmp_path / "got", want)


def test_ray_local_cluster(binary, tmp_path):
    """No --address: the driver starts a 3-CPU local cluster and stops it. --quiet: no progress lines."""
    r, timings = check_driver_run(binary, "pt", tmp_path, runner=["--ckptconv", binary, "--quiet"])
    assert "ckptconv_ray:" not in r.stderr, r.stderr
    print(f"local cluster: connect {timings['connect']:.2f} s, shutdown {timings['shutdown']:.2f} s")


def test_ray_wasm(ray_address, tmp_path, binary):
    """The plan, parts and finish run the WASI module under wasmtime, with IN's parent, OUT and --base preopened at
    their paths; --base given as --base=RELATIVE (to the driver's folder) works like the absolute path."""
    module = Path(os.environ.get("CKPTCONV_WASM", "target/wasi/ckptconv.wasm"))
    module = module if module.is_absolute() else REPO / module
    if not module.is_file():
        pytest.fail(f"WASI module not found at {module}: run `bash wasi/build.sh` or set CKPTCONV_WASM")
    runner = ["--wasm", str(module), "--wasmtime", shlex.join(runner_prefix())]
    relative = ["--base=" + os.path.relpath(MG / "base_hf", tmp_path), "--max-shard-size", "20KB"]
    check_driver_run(binary, "megatron", tmp_path, relative, address=ray_address, runner=runner)


# --- 2. a part killed mid-write is retried by Ray -------------------------------------------------------------

KILLER = """#!{python}
# Stands in for ckptconv. On the first run of part {part} only: runs the real one, stops it (SIGSTOP) as soon as a
# partial file of the part has bytes, records what is on disk, then SIGKILLs it and itself. Lost races (the file
# done before the stop) clean up and go again, 10 times at most.
import json, os, signal, subprocess, sys, time

cfg = json.load(open({cfg!r}))
args = sys.argv[1:]
part = args[args.index("--part") + 1] if "--part" in args else None
if part != cfg["part"] or os.path.exists(cfg["marker"]):
    os.execv(cfg["real"], [cfg["real"], *args])
open(cfg["marker"], "w").close()
out, planned = cfg["out"], {{f["name"]: f["size"] for f in cfg["files"]}}

def size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0

for tries in range(1, 11):
    proc = subprocess.Popen([cfg["real"], *args])
    while proc.poll() is None:
        partials = {{n: size(os.path.join(out, f".{{n}}.ckptconv-partial")) for n in planned}}
        if any(partials.values()):
            os.kill(proc.pid, signal.SIGSTOP)
            partials = {{n: size(os.path.join(out, f".{{n}}.ckptconv-partial")) for n in planned}}
            caught = [(n, s) for n, s in partials.items() if 0 < s < planned[n]]
            if caught:
                finals = [n for n in planned if os.path.exists(os.path.join(out, n))]
                json.dump({{"tries": tries, "file": caught[0][0], "partial_size": caught[0][1],
                           "planned_size": planned[caught[0][0]], "finals_present": finals}}, open(cfg["record"], "w"))
                proc.kill()
                proc.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    for n in planned:
        for name in (n, f".{{n}}.ckptconv-partial"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
sys.exit("killer: never caught part " + cfg["part"] + " mid-write in 10 tries")
"""


@pytest.fixture(scope="module")
def big_pt(tmp_path_factory):
    """~150 MB of random bf16 tensors in a torch.save file: shards of 50 MB take long enough to catch mid-write."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({f"layers.{i}.weight": torch.randn(2500, 2000, generator=gen).to(torch.bfloat16) for i in range(15)},
               path)
    return path


def test_ray_retries_a_part_killed_mid_write(binary, big_pt, ray_address, tmp_path):
    flags = ["--max-shard-size", "50MB"]
    want = convert_once(binary, big_pt, tmp_path / "want", flags)
    out = tmp_path / "got"
    groups = plan(binary, big_pt, out, flags)["groups"]
    victim = max(groups, key=lambda g: g["bytes"])
    cfg = {"real": binary, "part": f"{victim['part']}/{N}", "out": str(out), "files": victim["files"],
           "marker": str(tmp_path / "killed-once"), "record": str(tmp_path / "record.json")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    killer = tmp_path / "killer"
    killer.write_text(KILLER.format(python=sys.executable, part=cfg["part"], cfg=str(tmp_path / "cfg.json")))
    killer.chmod(0o755)

    r = drive(big_pt, out, flags, address=ray_address, runner=["--ckptconv", str(killer)],
              timings=tmp_path / "timings.json")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    assert 0 < record["partial_size"] < record["planned_size"], record
    assert record["finals_present"] == [], record
    attempts = {p["part"]: p["attempts"] for p in json.loads((tmp_path / "timings.json").read_text())["per_part"]}
    assert attempts == {g["part"]: 2 if g is victim else 1 for g in groups if g["files"]}
    assert_same_files(out, want)


# --- 3. a part that exits 1 fails the run at once ---------------------------------------------------------------

FAILER = """#!/usr/bin/env bash
# Stands in for ckptconv: part 2 fails with a clear error (and counts its runs), everything else is the real one.
for a in "$@"; do
  if [ "$a" = 2/{n} ]; then
    echo run >> {count}
    echo "ckptconv: error[input]: {inp}: simulated: tensor data ends early" >&2
    exit 1
  fi
done
exec {real} "$@"
"""


def test_ray_part_exit_1_is_not_retried(binary, ray_address, tmp_path):
    inp, flags = CASES["megatron"]
    failer, count, out = tmp_path / "failer", tmp_path / "count", tmp_path / "out"
    failer.write_text(FAILER.format(n=N, count=count, inp=inp, real=binary))
    failer.chmod(0o755)
    out.mkdir()
    for stale in (INDEX, "config.json"):  # an earlier run's, which --force must not leave beside new shards
        (out / stale).write_text("{}")
    r = drive(inp, out, flags + ["--force"], address=ray_address, runner=["--ckptconv", str(failer)])
    assert r.returncode == 1, r.stderr
    assert f"part 2/{N} failed" in r.stderr and "simulated: tensor data ends early" in r.stderr, r.stderr
    assert count.read_text() == "run\n", "a part that exited 1 was run again"
    left = sorted(os.listdir(out))  # the other parts' shards, if they ran before the failure
    assert INDEX not in left and "config.json" not in left and not [n for n in left if n.startswith(".")], left
    # With part 1's shards there, a second run without --force refuses them, before it connects to Ray.
    subprocess.run([binary, "convert", str(inp), str(out), *flags, "--part", f"1/{N}", "--force", "--quiet"],
                   check=True, capture_output=True)
    again = drive(inp, out, flags, address="127.0.0.1:1", runner=["--ckptconv", binary])
    assert again.returncode == 1 and "already exist; pass --force" in again.stderr, again.stderr


def test_ray_no_cluster_at_the_address(binary, tmp_path):
    """A wrong --address fails at once with exit 1 (Ray itself would retry for minutes), nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free: nothing listens there
    inp, flags = CASES["pt"]
    r = drive(inp, tmp_path / "out", flags, address=f"127.0.0.1:{port}", runner=["--ckptconv", binary])
    assert r.returncode == 1 and f"no Ray cluster at 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# --- 4. the Slurm recipe ------------------------------------------------------------------------------------------

def test_slurm_array_then_finish(binary, tmp_path):
    inp, flags = CASES["megatron"]
    want = convert_once(binary, inp, tmp_path / "want", flags)
    out = tmp_path / "got"
    env = {**os.environ, "IN": str(inp), "OUT": str(out), "N": str(N), "CKPTCONV": binary}

    def sbatch(script, task=None):
        extra = {"SLURM_ARRAY_TASK_ID": str(task)} if task else {}
        return subprocess.run(["bash", str(SLURM / script), *flags], capture_output=True, text=True,
                              env={**env, **extra})

    for task in (3, 1):
        assert sbatch("ckptconv-part.sbatch", task).returncode == 0
    early = sbatch("ckptconv-finish.sbatch")
    assert early.returncode == 1 and "missing" in early.stderr, early.stderr
    assert not (out / INDEX).exists()
    assert sbatch("ckptconv-part.sbatch", 2).returncode == 0
    done = sbatch("ckptconv-finish.sbatch")
    assert done.returncode == 0, done.stderr
    assert_same_files(out, want)


FAKE_SBATCH = """#!/usr/bin/env bash
# Records its arguments and the job environment; prints a job id as `sbatch --parsable` does (with a cluster name).
echo "$* | IN=$IN OUT=$OUT N=$N CKPTCONV=$CKPTCONV" >> {log}
echo "$((41 + $(wc -l < {log})));cluster"
"""


def test_slurm_submit_queues_array_and_dependent_finish(binary, tmp_path):
    inp, flags = CASES["pt"]
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CKPTCONV": binary}
    r = subprocess.run(["bash", str(SLURM / "submit.sh"), str(inp), str(tmp_path / "out"), str(N), *flags],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    job_env = f"IN={inp} OUT={tmp_path / 'out'} N={N} CKPTCONV={binary}"
    assert log.read_text().splitlines() == [
        f"--parsable --array=1-{N} {SLURM / 'ckptconv-part.sbatch'} {' '.join(flags)} | {job_env}",
        f"--parsable --dependency=afterok:42 {SLURM / 'ckptconv-finish.sbatch'} {' '.join(flags)} | {job_env}",
    ]
    assert not (tmp_path / "out").exists(), "submit.sh wrote output itself"


API = """import json, sys, ray
import ckptconv_ray
ray.init(address=sys.argv[1], log_to_driver=False)
binary, inp, outs, flags = sys.argv[2], sys.argv[3], sys.argv[4:6], json.loads(sys.argv[6])
runs = [ckptconv_ray.convert_checkpoint(inp, out, 3, flags, ckptconv=binary, quiet=True) for out in outs]
print(json.dumps({"connected": ray.is_initialized(), "parts": [len(r["per_part"]) for r in runs]}))
try:
    ckptconv_ray.convert_checkpoint(inp, outs[0], 3, flags, ckptconv=binary, quiet=True)
except ckptconv_ray.DriverError as e:
    print(json.dumps({"refused": str(e)}))
"""


def test_python_api_converts_on_the_callers_connection(binary, ray_address, tmp_path):
    """A long-lived process (a conversion service) connects once and converts twice through convert_checkpoint;
    the connection stays its own, both outputs equal one convert's, and an existing output is refused."""
    inp, flags = CASES["pt"]
    want = convert_once(binary, inp, tmp_path / "want", flags)
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(REPO / "python")}
    r = subprocess.run([sys.executable, "-c", API, ray_address, binary, str(inp), *outs, json.dumps(flags)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0] == {"connected": True, "parts": [3, 3]}, lines
    assert "already exist; pass --force" in lines[1]["refused"], lines
    for out in outs:
        assert_same_files(Path(out), want)
