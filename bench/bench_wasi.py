"""Benchmark the WASI build of `ckptconv convert` under wasmtime against the native binary, on the same .pt.

Owns: bench/bench_wasi.py. Input: bench_pt.py's cached Qwen2-1.5B-shaped bf16 .pt (~3.55 GB, generated once into
bench/data/). Each repetition runs, interleaved so drift hits all alike:
  native         target/release/ckptconv convert SRC OUT (on Linux its copies are in-kernel copy_file_range)
  native-nokcopy the same with CKPTCONV_NO_KERNEL_COPY=1 (the buffered read/write path every other target takes)
  wasi           target/wasi/ckptconv.wasm under wasmtime: `--dir bench/data::/in --dir OUT::/out`
Recorded: wall time (`sync` before each run), host peak RSS (GNU time when installed, see bench_pt.timed) and, for
wasi, the module's peak linear memory (CKPTCONV_WASM_MEMORY_REPORT, written by wasi/run.py; the wasmtime CLI has
no such report). The first repetition's wasi output is compared byte for byte with the native one.
Targets (from the issue): wasi wall <= 1.3x native, peak linear memory <= 64 MiB. Medians are printed, then JSON.

Runner: env CKPTCONV_WASM_RUNNER (e.g. "wasmtime run"), else `wasmtime run` if on PATH, else
`python wasi/run.py` (PyPI wasmtime). Build the module first: bash wasi/build.sh.
Run:  .venv/bin/python bench/bench_wasi.py [--reps 3] [--wasm-cap BYTES] [--no-verify]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_pt  # noqa: E402
from bench_pt import DATA, GNU_TIME, REPO, SRC, generate_in_child, timed  # noqa: E402

bench_pt.RSS_FILE = DATA / "rss_wasi.txt"  # timed() reads it at call time: our own, so a concurrent bench cannot clobber it

TARGET_RATIO = 1.3
TARGET_LINEAR = 64 << 20
MiB = 1 << 20


sys.path.insert(0, str(REPO / "wasi"))
from runner import runner_prefix  # noqa: E402  (wasi/runner.py)


def same_files(a, b, step=64 << 20):
    """Byte-compare two output folders (names and contents) without holding a file in memory."""
    na = sorted(p.relative_to(a).as_posix() for p in Path(a).rglob("*"))
    nb = sorted(p.relative_to(b).as_posix() for p in Path(b).rglob("*"))
    if na != nb:
        return f"listings differ: {na} vs {nb}"
    for rel in na:
        pa, pb = Path(a) / rel, Path(b) / rel
        if pa.is_dir():
            continue
        if pa.stat().st_size != pb.stat().st_size:
            return f"{rel}: sizes {pa.stat().st_size} vs {pb.stat().st_size}"
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            off = 0
            while True:
                x, y = fa.read(step), fb.read(step)
                if x != y:
                    return f"{rel}: differs in bytes {off}..{off + len(x)}"
                if not x:
                    break
                off += len(x)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ckptconv", default=os.environ.get("CKPTCONV", str(REPO / "target/release/ckptconv")))
    ap.add_argument("--wasm", default=os.environ.get("CKPTCONV_WASM", str(REPO / "target/wasi/ckptconv.wasm")))
    ap.add_argument("--wasm-cap", type=int, default=None,
                    help="also pass -W max-memory-size=BYTES to the wasi run (a run over the cap traps: exit 134)")
    ap.add_argument("--scratch", default=str(DATA / "out_wasi_bench"), help="scratch folder (deleted between runs)")
    ap.add_argument("--no-verify", action="store_true", help="skip the byte comparison of the first repetition")
    args = ap.parse_args()
    for p, how in ((args.ckptconv, "cargo build --release"), (args.wasm, "bash wasi/build.sh")):
        if not Path(p).is_file():
            raise SystemExit(f"{p} not found: run `{how}`")

    generate_in_child()
    scratch = Path(args.scratch)
    report = DATA / "wasm_peak.txt"
    runner = runner_prefix()
    limits = ["-W", f"max-memory-size={args.wasm_cap}"] if args.wasm_cap else []

    def wasi_argv(out):
        return runner + ["--dir", f"{SRC.parent}::/in", "--dir", f"{out}::/out"] + limits + [
            args.wasm, "convert", f"/in/{SRC.name}", "/out/hf", "--quiet"]

    tools = {
        "native": (lambda out: [args.ckptconv, "convert", str(SRC), str(out / "hf"), "--quiet"], {}),
        "native-nokcopy": (lambda out: [args.ckptconv, "convert", str(SRC), str(out / "hf"), "--quiet"],
                           {"CKPTCONV_NO_KERNEL_COPY": "1"}),
        "wasi": (wasi_argv, {"CKPTCONV_WASM_MEMORY_REPORT": str(report)}),
    }

    # Warm the runner's compiled-module cache (run.py keys it by the module and the -W keys) outside the timings.
    warm = scratch / "warm"
    shutil.rmtree(scratch, ignore_errors=True)
    warm.mkdir(parents=True)
    timed(runner + ["--dir", f"{warm}::/out"] + limits + [args.wasm, "--version"])

    runs = {name: [] for name in tools}
    verified = None
    for rep in range(args.reps):
        for name, (argv, env) in tools.items():
            out = scratch / name
            # Only the outputs still needed (native's, until rep 1's comparison) stay: 3.5 GB of old outputs in the
            # page cache would make whichever tool runs last pay for evicting them.
            for other in tools:
                if not (rep == 0 and other == "native" and name == "wasi"):
                    shutil.rmtree(scratch / other, ignore_errors=True)
            out.mkdir(parents=True)
            report.unlink(missing_ok=True)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                secs, rss = timed(argv(out))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            produced = sum(p.stat().st_size for p in (out / "hf").glob("*.safetensors"))
            assert produced >= SRC.stat().st_size * 0.9, f"{name} wrote only {produced} bytes"
            row = {"seconds": secs, "peak_rss_mib": rss}
            if name == "wasi" and report.exists():
                row["peak_linear_mib"] = int(report.read_text()) / MiB
            runs[name].append(row)
            extra = f"  linear {row['peak_linear_mib']:6.1f} MiB" if "peak_linear_mib" in row else ""
            print(f"rep {rep + 1}/{args.reps}  {name:<15}{secs:7.2f} s  RSS {rss:8.1f} MiB{extra}", flush=True)
        if rep == 0 and not args.no_verify:
            verified = same_files(scratch / "native" / "hf", scratch / "wasi" / "hf")
            print(f"rep 1: wasi output {'byte-identical to native' if verified is None else 'DIFFERS: ' + verified}", flush=True)
        for name in tools:
            shutil.rmtree(scratch / name, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    report.unlink(missing_ok=True)

    keys = ("seconds", "peak_rss_mib", "peak_linear_mib")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys if all(k in r for r in rs)} for n, rs in runs.items()}
    size = SRC.stat().st_size
    ratio = {base: med["wasi"]["seconds"] / med[base]["seconds"] for base in ("native", "native-nokcopy")}
    linear = med["wasi"].get("peak_linear_mib")
    print(f"\ninput {SRC.name}: {size / 2**30:.2f} GiB, medians of {args.reps} runs; runner: {' '.join(runner)}; "
          f"{'host peak RSS by GNU time' if GNU_TIME else 'host peak RSS by wait4 (includes the spawning parent floor)'}")
    print(f"{'tool':<16}{'seconds':>9}{'GB/s':>7}{'x native':>10}{'RSS MiB':>10}{'linear MiB':>12}")
    for n, m in med.items():
        lin = f"{m['peak_linear_mib']:>12.1f}" if "peak_linear_mib" in m else f"{'-':>12}"
        print(f"{n:<16}{m['seconds']:>9.2f}{size / m['seconds'] / 1e9:>7.2f}{m['seconds'] / med['native']['seconds']:>10.2f}"
              f"{m['peak_rss_mib']:>10.1f}{lin}")
    verdict = {
        "wall_ratio_vs_native": ratio["native"],
        "wall_ratio_vs_native_nokcopy": ratio["native-nokcopy"],
        "wall_target_met": ratio["native"] <= TARGET_RATIO,
        "peak_linear_mib": linear,
        "linear_target_met": None if linear is None else linear * MiB <= TARGET_LINEAR,
        "output_identical": None if args.no_verify else verified is None,
    }
    print(f"wasi/native {ratio['native']:.2f}x (target <= {TARGET_RATIO}x: {'met' if verdict['wall_target_met'] else 'NOT met'}); "
          f"wasi/native-nokcopy {ratio['native-nokcopy']:.2f}x; peak linear memory "
          + ("not reported by this runner" if linear is None else
             f"{linear:.1f} MiB (target <= 64 MiB: {'met' if verdict['linear_target_met'] else 'NOT met'})"))
    print(json.dumps({"input": str(SRC), "input_bytes": size, "reps": args.reps, "runner": runner,
                      "wasm_cap": args.wasm_cap, "median": med, "verdict": verdict, "runs": runs,
                      "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


if __name__ == "__main__":
    main()
