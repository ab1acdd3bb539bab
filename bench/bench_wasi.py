"""Benchmark the WASI build of `ckptconv convert` under wasmtime against the native binary, on the same .pt.

Owns: bench/bench_wasi.py. Input: bench_pt.py's cached Qwen2-1.5B-shaped bf16 .pt (~3.55 GB, generated once into
bench/data/). Each repetition runs, interleaved so drift hits all alike (bench_pt.interleaved):
  native          target/release/ckptconv convert SRC OUT (on Linux its copies are in-kernel copy_file_range)
  native-nokcopy  the same with CKPTCONV_NO_KERNEL_COPY=1 (the buffered read/write path every other target takes)
  wasi            target/wasi/ckptconv.wasm under `wasmtime run`: `--dir bench/data::/in --dir OUT::/out`
  wasi-timeout    the same with `-W timeout=3600s` (wasmtime then does file I/O on a helper thread through
                  buffers of its own instead of straight into the module's memory)
  wasi-pypi       the same module under wasi/run.py (PyPI wasmtime: the C API always takes that helper-thread path)
The wasi rows need the wasmtime CLI on PATH; without it only wasi-pypi runs. CKPTCONV_WASM_RUNNER replaces the
runner of the `wasi` row. Every wasi run is capped with `-W max-memory-size` (64 MiB, the issue's bound; a run over
the cap traps and the bench fails), so a finished run is itself the proof of the bound; wasi/run.py also reports
the peak linear memory (CKPTCONV_WASM_MEMORY_REPORT). Recorded: wall time (`sync` before each run) and host peak
RSS (GNU time when installed, see bench_pt.timed). In the first repetition every tool's output is hashed and must
equal native's. Target (from the issue): wasi wall <= 1.3x native. Medians are printed, then JSON.

Build the module first: bash wasi/build.sh.
Run:  .venv/bin/python bench/bench_wasi.py [--reps 3] [--wasm-cap BYTES] [--no-verify]
"""

import argparse
import hashlib
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
from bench_pt import DATA, GNU_TIME, REPO, SRC, generate_in_child, interleaved  # noqa: E402

bench_pt.RSS_FILE = DATA / "rss_wasi.txt"  # timed() reads it at call time: our own, so a concurrent bench cannot clobber it

TARGET_RATIO = 1.3
TARGET_LINEAR = 64 << 20
MiB = 1 << 20


sys.path.insert(0, str(REPO / "wasi"))
from runner import runner_prefix  # noqa: E402  (wasi/runner.py)

PYPI_RUNNER = [sys.executable, str(REPO / "wasi" / "run.py")]


def tree_digest(folder):
    """{relative path: sha256} of every file under `folder`, read in 64 MiB pieces."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while piece := f.read(64 << 20):
                    h.update(piece)
            out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ckptconv", default=os.environ.get("CKPTCONV", str(REPO / "target/release/ckptconv")))
    ap.add_argument("--wasm", default=os.environ.get("CKPTCONV_WASM", str(REPO / "target/wasi/ckptconv.wasm")))
    ap.add_argument("--wasm-cap", type=int, default=TARGET_LINEAR,
                    help="-W max-memory-size=BYTES for every wasi run (default 64 MiB; a run over the cap traps)")
    ap.add_argument("--scratch", default=str(DATA / "out_wasi_bench"), help="scratch folder (deleted between runs)")
    ap.add_argument("--no-verify", action="store_true", help="skip the output comparison of the first repetition")
    args = ap.parse_args()
    for p, how in ((args.ckptconv, "cargo build --release"), (args.wasm, "bash wasi/build.sh")):
        if not Path(p).is_file():
            raise SystemExit(f"{p} not found: run `{how}`")

    generate_in_child()
    scratch = Path(args.scratch)
    report = DATA / "wasm_peak.txt"
    cap = ["-W", f"max-memory-size={args.wasm_cap}"]
    convert = ["convert", f"/in/{SRC.name}", "/out/hf", "--quiet"]

    def wasi(runner, *extra):
        return lambda: runner + ["--dir", f"{SRC.parent}::/in", "--dir", f"{scratch}::/out"] + cap + list(extra) + [
            args.wasm] + convert

    native = [args.ckptconv, "convert", str(SRC), str(scratch / "hf"), "--quiet"]
    tools = {"native": lambda: native, "native-nokcopy": lambda: ["env", "CKPTCONV_NO_KERNEL_COPY=1"] + native}
    runner = runner_prefix()
    if runner != PYPI_RUNNER:
        tools["wasi"] = wasi(runner)
        tools["wasi-timeout"] = wasi(runner, "-W", "timeout=3600s")
    tools["wasi-pypi"] = wasi(PYPI_RUNNER)
    wasi_rows = [n for n in tools if n.startswith("wasi")]

    # Warm run.py's compiled-module cache (keyed by the module and the -W keys) outside the timings.
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    bench_pt.timed(PYPI_RUNNER + ["--dir", f"{scratch}::/out"] + cap + [args.wasm, "--version"])

    digests = {}

    def check(name, rep, out):
        row = {}
        if report.exists():  # only wasi/run.py writes it
            row["peak_linear_mib"] = int(report.read_text()) / MiB
        report.unlink(missing_ok=True)
        produced = sum(p.stat().st_size for p in (out / "hf").glob("*.safetensors"))
        assert produced >= SRC.stat().st_size * 0.9, f"{name} wrote only {produced} bytes"
        if rep == 0 and not args.no_verify:
            digests[name] = tree_digest(out / "hf")
            same = digests[name] == digests["native"]
            print(f"rep 1: {name} output {'byte-identical to native' if same else 'DIFFERS from native'}", flush=True)
        return row

    os.environ["CKPTCONV_WASM_MEMORY_REPORT"] = str(report)
    runs = interleaved(tools, args.reps, scratch, check)

    keys = ("seconds", "peak_rss_mib", "peak_linear_mib")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys if all(k in r for r in rs)} for n, rs in runs.items()}
    size = SRC.stat().st_size
    print(f"\ninput {SRC.name}: {size / 2**30:.2f} GiB, medians of {args.reps} runs; wasi runner: {' '.join(runner)}; "
          f"every wasi run capped at {args.wasm_cap / MiB:.0f} MiB of linear memory; "
          f"{'host peak RSS by GNU time' if GNU_TIME else 'host peak RSS by wait4 (includes the spawning parent floor)'}")
    print(f"{'tool':<16}{'seconds':>9}{'GB/s':>7}{'x native':>10}{'RSS MiB':>10}{'linear MiB':>12}")
    for n, m in med.items():
        lin = f"{m['peak_linear_mib']:>12.1f}" if "peak_linear_mib" in m else f"{'-':>12}"
        print(f"{n:<16}{m['seconds']:>9.2f}{size / m['seconds'] / 1e9:>7.2f}{m['seconds'] / med['native']['seconds']:>10.2f}"
              f"{m['peak_rss_mib']:>10.1f}{lin}")
    verdict = {}
    for n in wasi_rows:
        ratio = med[n]["seconds"] / med["native"]["seconds"]
        verdict[n] = {
            "wall_ratio_vs_native": ratio,
            "wall_ratio_vs_native_nokcopy": med[n]["seconds"] / med["native-nokcopy"]["seconds"],
            "wall_target_met": ratio <= TARGET_RATIO,
            "linear_memory_within_cap_mib": args.wasm_cap / MiB,
            "peak_linear_mib": med[n].get("peak_linear_mib"),
            "output_identical": None if args.no_verify else digests[n] == digests["native"],
        }
        print(f"{n}/native {ratio:.2f}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    ok = args.no_verify or all(digests[n] == digests["native"] for n in tools)
    print(json.dumps({"input": str(SRC), "input_bytes": size, "reps": args.reps, "runner": runner,
                      "wasm_cap": args.wasm_cap, "median": med, "verdict": verdict, "runs": runs,
                      "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    if not ok:
        raise SystemExit("an output differs from native's")


if __name__ == "__main__":
    main()
