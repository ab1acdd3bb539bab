"""Benchmark how ckptconv's cost grows with the number of tensors (issue #15, "Linear cost"), against torch.

Owns: bench/bench_scale.py (its inputs live in the gitignored bench/data/). Inputs, generated once by real torch in
a child process (the timing parent never imports torch, see bench_pt.generate_in_child):
  pt10k, pt100k   torch.save of 10,000 and 100,000 small tensors (16 float32 each, MoE-style expert names)
  dcp100k         a single-process torch.distributed.checkpoint save (dcp.save(no_dist=True)) of the same 100,000
Each repetition runs, interleaved (bench_pt.interleaved, `sync` before each run, GNU time for peak RSS):
  ckptconv convert on each input; torch.load + safetensors save_file on the .pt files; dcp_to_torch_save
  (torch.distributed.checkpoint.format_utils) + torch.load + save_file on the DCP folder.
Then hostile pickles, written here in the bench run, go to the WASI module (`ckptconv inspect`, under wasi/runner.py's
runner: the wasmtime CLI if on PATH, else wasi/run.py): one dict of 1,000,000 int keys, one of 1,000,000 str keys,
and 1,000,000 SETITEMs over only 1,000 distinct keys (a batched SETITEMS stream as pickle writes it; Python reads
each back to check the bytes). Each must finish or be refused with a clean error (exit 0 or 1, no trap).
Targets: 100k convert <= 12x the 10k one; faster than torch on 100k; each hostile pickle <= 10 s under WASI.
Medians are printed, then JSON.

Build first: cargo build --release && bash wasi/build.sh
Run:  .venv/bin/python bench/bench_scale.py [--reps 3] [--wasm target/wasi/ckptconv.wasm]
"""

import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_pt  # noqa: E402
from bench_pt import DATA, GNU_TIME, REPO, bench_args, interleaved  # noqa: E402  (no torch import: keeps the parent small)

sys.path.insert(0, str(REPO / "wasi"))
from runner import runner_prefix  # noqa: E402  (wasi/runner.py)

bench_pt.RSS_FILE = DATA / "rss_scale.txt"  # timed() reads it at call time: our own, so a concurrent bench cannot clobber it

COUNTS = (10_000, 100_000)
PT = {n: DATA / f"scale_{n // 1000}k.pt" for n in COUNTS}
DCP = DATA / "scale_100k_dcp"
DCP_COUNT = 100_000
HOSTILE_KEYS = 1_000_000
TARGET_RATIO, TARGET_WASI_SECONDS = 12, 10

TORCH_PT = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2], metadata={"format": "pt"})
"""

TORCH_DCP = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
tmp = Path(sys.argv[2]) / "full.pt"
dcp_to_torch_save(sys.argv[1], tmp)
save_file(torch.load(tmp, weights_only=True), Path(sys.argv[2]) / "model.safetensors", metadata={"format": "pt"})
tmp.unlink()
"""


def names(n):
    """MoE-shaped names: 64 experts of 3 projections per layer, as many layers as it takes."""
    for i in range(n):
        layer, rest = divmod(i, 64 * 3)
        expert, proj = divmod(rest, 3)
        yield f"model.layers.{layer}.mlp.experts.{expert}.{('gate_proj', 'up_proj', 'down_proj')[proj]}.weight"


def state(n):
    import torch

    return {name: torch.full((16,), float(i % 1000)) for i, name in enumerate(names(n))}


def generate():
    """Writes the .pt files and the DCP folder once; a marker beside each guards against a half-written cache."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    DATA.mkdir(parents=True, exist_ok=True)
    for n, path in PT.items():
        marker = path.with_suffix(".ok")
        if not (path.exists() and marker.exists()):
            t0 = time.perf_counter()
            tmp = path.with_suffix(".partial")
            torch.save(state(n), tmp)
            tmp.rename(path)
            marker.write_text(str(path.stat().st_size))
            print(f"generated {path.name} ({n} tensors) in {time.perf_counter() - t0:.0f}s", flush=True)
    marker = DATA / f"{DCP.name}.ok"
    if not (DCP.exists() and marker.exists()):
        import shutil

        t0 = time.perf_counter()
        shutil.rmtree(DCP, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state(DCP_COUNT), checkpoint_id=DCP, no_dist=True)
        marker.write_text("ok")
        print(f"generated {DCP.name} ({DCP_COUNT} tensors) in {time.perf_counter() - t0:.0f}s", flush=True)


def hostile_pickles():
    """Hand-written protocol-2 pickles of one dict, in SETITEMS batches of 1,000 pairs as pickle.dumps writes them:
    {name: bytes}. Keys: 1M distinct ints; 1M distinct strs; 1M SETITEMs cycling over 1,000 int keys."""

    def key_int(i):
        return b"J" + struct.pack("<i", i)

    def key_str(i):
        s = f"model.layers.{i}.weight".encode()
        return b"\x8c" + bytes([len(s)]) + s

    def dict_pickle(keys):
        out = bytearray(b"\x80\x02}")
        for start in range(0, len(keys), 1000):
            out += b"("
            for k in keys[start:start + 1000]:
                out += k + b"K\x01"
            out += b"u"
        return bytes(out + b".")

    return {
        "hostile_1m_int_keys.pkl": (dict_pickle([key_int(i) for i in range(HOSTILE_KEYS)]), HOSTILE_KEYS),
        "hostile_1m_str_keys.pkl": (dict_pickle([key_str(i) for i in range(HOSTILE_KEYS)]), HOSTILE_KEYS),
        "hostile_1m_duplicate_keys.pkl": (dict_pickle([key_int(i % 1000) for i in range(HOSTILE_KEYS)]), 1000),
    }


def write_hostile():
    """Writes the hostile pickles and checks in a child that Python reads each as a dict of the expected size."""
    paths = []
    for name, (data, distinct) in hostile_pickles().items():
        path = DATA / name
        path.write_bytes(data)
        paths.append((path, distinct))
    check = "import pickle, sys\nfor p, n in zip(sys.argv[1::2], sys.argv[2::2]):\n    assert len(pickle.load(open(p, 'rb'))) == int(n), p"
    subprocess.run([sys.executable, "-c", check, *(str(x) for p in paths for x in p)], check=True)
    return [p for p, _ in paths]


def safetensors_count(path):
    """The number of tensors in a safetensors file's header (read without torch)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(1 for k in header if k != "__metadata__")


def run_wasi(wasm, path, reps):
    """`ckptconv inspect` of one hostile pickle under WASI, `reps` times: [(seconds, exit code, last stderr line)]."""
    argv = runner_prefix() + ["--dir", f"{path.parent}::/in", wasm, "inspect", f"/in/{path.name}"]
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        dt = time.perf_counter() - t0
        runs.append((dt, p.returncode, (p.stderr.strip().splitlines() or [""])[-1]))
    return runs


def main():
    args = bench_args(__doc__, "out_scale", extra=[
        ("--wasm", {"default": str(REPO / "target/wasi/ckptconv.wasm"), "help": "the module bash wasi/build.sh writes"}),
    ])
    if args.generate_only:
        return generate()
    subprocess.run([sys.executable, __file__, "--generate-only"], check=True)
    out = Path(args.out)
    expect = {}
    tools = {}
    for n, path in PT.items():
        tools[f"ckptconv pt{n // 1000}k"] = lambda path=path: [args.ckptconv, "convert", str(path), str(out)]
        expect[f"ckptconv pt{n // 1000}k"] = n
    tools["ckptconv dcp100k"] = lambda: [args.ckptconv, "convert", str(DCP), str(out)]
    expect["ckptconv dcp100k"] = DCP_COUNT
    if not args.no_torch:
        for n, path in PT.items():
            tools[f"torch pt{n // 1000}k"] = lambda path=path: [sys.executable, "-c", TORCH_PT, str(path), str(out / "model.safetensors")]
            expect[f"torch pt{n // 1000}k"] = n
        tools["torch dcp100k"] = lambda: [sys.executable, "-c", TORCH_DCP, str(DCP), str(out)]
        expect["torch dcp100k"] = DCP_COUNT

    def check(name, rep, out):
        files = sorted(out.glob("*.safetensors"))
        got = sum(safetensors_count(f) for f in files)
        assert got == expect[name], f"{name} wrote {got} tensors, expected {expect[name]}"

    runs = interleaved(tools, args.reps, out, check)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for n, rs in runs.items()}

    hostile = {}
    if Path(args.wasm).is_file():
        for path in write_hostile():
            hostile[path.name] = run_wasi(args.wasm, path, args.reps)
            for dt, code, line in hostile[path.name]:
                print(f"wasi {path.name:<32} {dt:7.2f} s  exit {code}  {line[:100]}", flush=True)
    else:
        print(f"no WASI module at {args.wasm} (bash wasi/build.sh): hostile pickles skipped")

    rss_note = "peak RSS by GNU time" if GNU_TIME else "peak RSS by wait4 (includes the spawning parent's floor)"
    print(f"\nmedians of {args.reps} runs; {rss_note}")
    print(f"{'run':<20}{'tensors':>9}{'seconds':>10}{'peak RSS MiB':>15}")
    for n, m in med.items():
        print(f"{n:<20}{expect[n]:>9}{m['seconds']:>10.2f}{m['peak_rss_mib']:>15.1f}")
    ratio = med["ckptconv pt100k"]["seconds"] / med["ckptconv pt10k"]["seconds"]
    verdict = {"pt100k_over_pt10k": ratio, "ratio_met": ratio <= TARGET_RATIO}
    print(f"ckptconv 100k / 10k: {ratio:.1f}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    for kind in ("pt100k", "dcp100k"):
        if f"torch {kind}" in med:
            ours, theirs = med[f"ckptconv {kind}"]["seconds"], med[f"torch {kind}"]["seconds"]
            verdict[f"faster_than_torch_{kind}"] = ours < theirs
            print(f"{kind}: ckptconv {ours:.2f} s vs torch {theirs:.2f} s ({theirs / ours:.1f}x faster)")
    for name, rs in hostile.items():
        worst = max(dt for dt, _, _ in rs)
        clean = all(code in (0, 1) for _, code, _ in rs)
        verdict[name] = {"max_seconds": worst, "clean": clean, "met": clean and worst <= TARGET_WASI_SECONDS}
        print(f"wasi {name}: max {worst:.2f} s, exit {sorted({c for _, c, _ in rs})} "
              f"(target <= {TARGET_WASI_SECONDS} s, clean: {'met' if verdict[name]['met'] else 'NOT met'})")
    print(json.dumps({"reps": args.reps, "median": med, "verdict": verdict, "runs": runs,
                      "wasi_runner": runner_prefix(), "hostile": hostile}))


if __name__ == "__main__":
    main()
