"""Disk-bound I/O benchmark: ckptconv's copy paths and casts against `cp`, with `sync` inside every timing.

Owns: bench/bench_io.py (its fp32 input is cached in the gitignored bench/data/).
The other benchmarks time page-cache-hot runs; this one times what reaches the disk. Before every run the page
cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, which needs root: without it the script says so and
only syncs), then the tool runs and `sync` flushes its output, both inside the timing; the output is deleted
after each run. Peak RSS comes from GNU time (`/usr/bin/time -f %M`). Every repetition runs every tool once, in
turn (interleaved), so drift and other jobs on the machine hit all tools alike; medians and ratios to the group's
`cp` are printed (of the medians, and the median of each repetition's own ratio), then JSON.

Groups (`--groups`, default all):
  pt        bench_pt.py's bf16 .pt (3.55 GB): cp; ckptconv's default copy path; the in-kernel copy
            (CKPTCONV_KERNEL_COPY=1); the buffered copy (CKPTCONV_NO_KERNEL_COPY=1); `--dtype fp16` (bf16 -> fp16)
  cast      a Qwen2-shaped fp32 .pt of 9 layers (0.88 B parameters, 3.5 GB, written once here by torch.save):
            cp; `--dtype fp16`; `--dtype bf16`
  dcp       bench_dcp.py's 8-rank DCP folder: cp of the model's bytes; default; kernel; buffered
  megatron  bench_megatron.py's TP=2 legacy checkpoint (mg2hf): cp of both rank files; default; kernel; buffered

Run:  .venv/bin/python bench/bench_io.py [--reps 5] [--groups pt,cast] [--no-drop] [--ckptconv target/release/ckptconv]
"""

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# None of these import torch at module level, so the timing parent stays small.
import bench_dcp  # noqa: E402
import bench_megatron  # noqa: E402
import bench_pt  # noqa: E402
from bench_pt import DATA, REPO, shapes  # noqa: E402

FP32 = DATA / "qwen2_9l_untied_fp32.pt"
FP32_LAYERS = 9
RSS_FILE = DATA / "rss_io.txt"
DROP = Path("/proc/sys/vm/drop_caches")
KERNEL = {"CKPTCONV_KERNEL_COPY": "1"}
BUFFERED = {"CKPTCONV_NO_KERNEL_COPY": "1"}


def generate_fp32():
    """FP32 once, by torch.save, with random values (casts see real data, pages are incompressible)."""
    import torch

    marker = FP32.with_suffix(".ok")
    if FP32.exists() and marker.exists() and marker.read_text() == str(FP32.stat().st_size):
        return
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes(layers=FP32_LAYERS)}
    params = sum(t.numel() for t in sd.values())
    tmp = FP32.with_suffix(".partial")
    torch.save(sd, tmp)
    del sd
    tmp.rename(FP32)
    marker.write_text(str(FP32.stat().st_size))
    print(f"generated {FP32} ({params / 1e9:.2f} B params, {FP32.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)


def can_drop():
    try:
        subprocess.run(["sync"], check=True)
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv, env, drop):
    """Drop the page cache (untimed), then time argv plus the `sync` that flushes what it wrote.
    Returns (seconds, peak RSS MiB)."""
    subprocess.run(["sync"], check=True)
    if drop:
        DROP.write_text("3\n")
    argv = ["/usr/bin/time", "-f", "%M", "-o", str(RSS_FILE)] + argv
    t0 = time.perf_counter()
    r = subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(["sync"], check=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed with status {r.returncode}: {r.stderr.decode(errors='replace')}")
    return dt, int(RSS_FILE.read_text().split()[-1]) / 1024


def loadavg():
    return os.getloadavg()[0]


def io_pressure():
    """Share of the last 10 s in which some task waited on I/O (Linux PSI), or None: other jobs' disk traffic."""
    try:
        return float(Path("/proc/pressure/io").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--groups", default="pt,cast,dcp,megatron")
    ap.add_argument("--ckptconv", default=os.environ.get("CKPTCONV", str(REPO / "target/release/ckptconv")))
    ap.add_argument("--out", default=str(DATA / "out_io"), help="scratch output dir (deleted after each run)")
    ap.add_argument("--no-drop", action="store_true", help="do not drop the page cache (sync only)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        return generate_fp32()
    groups = args.groups.split(",")
    # Inputs are generated in children, so the timing parent never imports torch.
    if "pt" in groups:
        subprocess.run([sys.executable, bench_pt.__file__, "--generate-only"], check=True)
    if "cast" in groups:
        subprocess.run([sys.executable, __file__, "--generate-only"], check=True)
    if "dcp" in groups:
        subprocess.run([sys.executable, bench_dcp.__file__, "--generate-only"], check=True)
    if "megatron" in groups:
        bench_megatron.generate_in_child()

    drop = not args.no_drop and can_drop()
    out = Path(args.out)
    c = args.ckptconv
    mg = [c, "mg2hf", str(bench_megatron.ACTOR), str(out), str(bench_megatron.BASE)]
    table = {  # group -> (cp's source, {tool: (argv, env)})
        "pt": (bench_pt.SRC, {
            "default": ([c, "convert", str(bench_pt.SRC), str(out)], {}),
            "kernel": ([c, "convert", str(bench_pt.SRC), str(out)], KERNEL),
            "buffered": ([c, "convert", str(bench_pt.SRC), str(out)], BUFFERED),
            "fp16": ([c, "convert", str(bench_pt.SRC), str(out), "--dtype", "fp16"], {}),
        }),
        "cast": (FP32, {
            "fp16": ([c, "convert", str(FP32), str(out), "--dtype", "fp16"], {}),
            "bf16": ([c, "convert", str(FP32), str(out), "--dtype", "bf16"], {}),
        }),
        "dcp": (bench_dcp.FLAT, {
            "default": ([c, "convert", str(bench_dcp.SRC), str(out)], {}),
            "kernel": ([c, "convert", str(bench_dcp.SRC), str(out)], KERNEL),
            "buffered": ([c, "convert", str(bench_dcp.SRC), str(out)], BUFFERED),
        }),
        "megatron": (bench_megatron.CP_SRC, {
            "default": (mg, {}),
            "kernel": (mg, KERNEL),
            "buffered": (mg, BUFFERED),
        }),
    }
    tools = []
    for g in groups:
        src, rest = table[g]
        tools.append((g, "cp", ["cp", str(src), str(out / "copy.bin")], {}))
        tools += [(g, name, argv, env) for name, (argv, env) in rest.items()]

    print(f"page cache {'dropped before each run' if drop else 'NOT dropped (needs root): sync only'}; "
          f"{args.reps} reps; load {loadavg():.1f}", flush=True)
    runs = {(g, n): [] for g, n, _, _ in tools}
    loads = []
    for rep in range(args.reps):
        for g, name, argv, env in tools:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            load, psi = loadavg(), io_pressure()
            secs, rss = timed(argv, env, drop)
            if name != "cp":
                produced = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                assert produced > 0, f"{g}/{name} wrote no safetensors"
            shutil.rmtree(out, ignore_errors=True)
            runs[(g, name)].append({"seconds": secs, "peak_rss_mib": rss, "load": load, "io_pressure_before": psi})
            loads.append(load)
            print(f"rep {rep + 1}/{args.reps}  {g:<9}{name:<9}{secs:7.2f} s {rss:7.1f} MiB  load {load:4.1f}  "
                  f"io pressure {psi}%", flush=True)
    subprocess.run(["sync"], check=True)

    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("seconds", "peak_rss_mib")} | {
        "max_rss_mib": max(r["peak_rss_mib"] for r in rs)} for k, rs in runs.items()}
    print(f"\nmedians of {args.reps} reps, sync inside each timing, page cache "
          f"{'dropped' if drop else 'not dropped'} before each run; load (1 min) median {statistics.median(loads):.1f}, "
          f"range {min(loads):.1f}-{max(loads):.1f}")
    # Besides the ratio of medians, the median of each repetition's own ratio to the cp run beside it: drift
    # between repetitions (other jobs' I/O) cancels out of it.
    for (g, n), m in med.items():
        cps = runs[(g, "cp")]
        m["x_cp"] = m["seconds"] / med[(g, "cp")]["seconds"]
        m["x_cp_paired"] = statistics.median(r["seconds"] / c["seconds"] for r, c in zip(runs[(g, n)], cps))
    print(f"{'group':<10}{'tool':<10}{'seconds':>9}{'x cp':>7}{'paired':>8}{'median RSS':>12}{'max RSS':>9}")
    for (g, n), m in med.items():
        print(f"{g:<10}{n:<10}{m['seconds']:>9.2f}{m['x_cp']:>7.2f}{m['x_cp_paired']:>8.2f}{m['peak_rss_mib']:>12.1f}"
              f"{m['max_rss_mib']:>9.1f}")
    print(json.dumps({"reps": args.reps, "dropped": drop, "ckptconv": c,
                      "median": {f"{g}/{n}": m for (g, n), m in med.items()},
                      "runs": {f"{g}/{n}": r for (g, n), r in runs.items()}}))


if __name__ == "__main__":
    main()
