"""Benchmark `ckptconv convert` on a Qwen2-1.5B-shaped bf16 .pt against `cp` and the torch pipeline.

Owns: bench/ (this script, README.md, .gitignore; bench/data/ is a gitignored cache).
The input (~3.55 GB) is generated once into bench/data/. Each repetition runs, interleaved so drift hits all
tools alike: cp of the file; ckptconv convert; torch.load(mmap=True) + safetensors save_file in a subprocess
(skipped if torch is missing). `sync` runs before each timing; outputs are deleted between runs. Wall time
and per-process peak RSS (os.wait4 -> ru_maxrss) are recorded; medians are printed, then JSON.

Run:  .venv/bin/python bench/bench_pt.py [--reps 3] [--ckptconv target/release/ckptconv]
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data"
SRC = DATA / "qwen2_1.5b_untied_bf16.pt"

# DeepSeek-R1-Distill-Qwen-1.5B (RLinf's model): Qwen2-1.5B shapes with an untied lm_head, 1.78B parameters,
# about 3.55 GB in bf16. lm_head is its own tensor, not a view of the embedding, so safetensors' save_file
# accepts the torch baseline.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 151936, 1536, 28, 12, 2, 8960

TORCH_PIPELINE = """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
save_file(sd, sys.argv[2], metadata={"format": "pt"})
"""


def shapes(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, inter=INTER):
    """Names and shapes of a Qwen2-style model (DeepSeek-R1-Distill-Qwen-1.5B by default)."""
    VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = vocab, hidden, layers, heads, kv_heads, inter
    kv = HIDDEN // HEADS * KV_HEADS
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield p + "self_attn.q_proj.bias", (HIDDEN,)
        yield p + "self_attn.k_proj.weight", (kv, HIDDEN)
        yield p + "self_attn.k_proj.bias", (kv,)
        yield p + "self_attn.v_proj.weight", (kv, HIDDEN)
        yield p + "self_attn.v_proj.bias", (kv,)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def generate():
    """Write SRC once; a marker with the expected size guards against a half-written cache."""
    import torch

    marker = SRC.with_suffix(".ok")
    if SRC.exists() and marker.exists() and marker.read_text() == str(SRC.stat().st_size):
        return
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Cheap, non-zero fill: a per-tensor constant (values don't matter, pages must be real).
    sd = {name: torch.empty(shape, dtype=torch.bfloat16).fill_(0.001 * (i % 997 + 1)) for i, (name, shape) in enumerate(shapes())}
    params = sum(t.numel() for t in sd.values())
    tmp = SRC.with_suffix(".partial")
    torch.save(sd, tmp)
    del sd
    tmp.rename(SRC)
    marker.write_text(str(SRC.stat().st_size))
    print(f"generated {SRC} ({params / 1e9:.2f} B params, {SRC.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s")


def generate_in_child():
    """Generate in a subprocess: Linux carries the parent's peak RSS into a spawned child's ru_maxrss
    (the vfork'd mm is accounted at exec), so the timing parent must stay small and never import torch."""
    subprocess.run([sys.executable, __file__, "--generate-only"], check=True)


GNU_TIME = shutil.which("time") if Path("/usr/bin/time").exists() else None
RSS_FILE = DATA / "rss.txt"


def timed(argv):
    """Run argv after `sync`; return (seconds, peak RSS MiB). Raises on nonzero exit.

    With GNU time on the machine the tool runs under `time -f %M`: time is a small C program, so its child's
    peak RSS is the tool's own. Without it, wait4's figure has the spawning Python's floor in it."""
    subprocess.run(["sync"], check=True)
    if GNU_TIME:
        argv = ["/usr/bin/time", "-f", "%M", "-o", str(RSS_FILE)] + argv
    t0 = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, ru = os.wait4(pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed with status {os.waitstatus_to_exitcode(status)}")
    if GNU_TIME:
        return dt, int(RSS_FILE.read_text().split()[-1]) / 1024
    return dt, ru.ru_maxrss / 1024  # Linux reports KiB


def interleaved(tools, reps, out, check):
    """Runs every tool once per repetition, in turn so that drift hits them all alike, each into an emptied `out`
    (deleted at the end). `check(name, rep, out)` validates what a tool wrote and returns extra fields for its row,
    or None. Returns {tool: [{"seconds", "peak_rss_mib", ...}]}."""
    runs = {name: [] for name in tools}
    width = max(map(len, tools)) + 1
    for rep in range(reps):
        for name, argv in tools.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            secs, rss = timed(argv())
            runs[name].append({"seconds": secs, "peak_rss_mib": rss, **(check(name, rep, out) or {})})
            print(f"rep {rep + 1}/{reps}  {name:<{width}} {secs:7.2f} s  {rss:8.1f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return runs


def bench_args(doc, out_name, torch_help="skip the torch pipeline", extra=()):
    """The options the benchmarks share: --reps, --ckptconv, --out (a scratch folder under bench/data), --no-torch,
    the hidden --generate-only, and `extra` (argument name, keyword arguments) pairs."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ckptconv", default=os.environ.get("CKPTCONV", str(REPO / "target/release/ckptconv")))
    ap.add_argument("--out", default=str(DATA / out_name), help="scratch output dir (deleted between runs)")
    ap.add_argument("--no-torch", action="store_true", help=torch_help)
    for name, kw in extra:
        ap.add_argument(name, **kw)
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main():
    args = bench_args(__doc__, "out")
    if args.generate_only:
        return generate()

    generate_in_child()
    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    out = Path(args.out)
    tools = {
        "cp": lambda: ["cp", str(SRC), str(out / "model.pt")],
        "ckptconv": lambda: [args.ckptconv, "convert", str(SRC), str(out)],
    }
    if have_torch:
        tools["torch"] = lambda: [sys.executable, "-c", TORCH_PIPELINE, str(SRC), str(out / "model.safetensors")]

    def check(name, rep, out):
        if name != "cp":
            produced = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            assert produced >= SRC.stat().st_size * 0.9, f"{name} wrote only {produced} bytes"

    runs = interleaved(tools, args.reps, out, check)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for n, rs in runs.items()}
    size = SRC.stat().st_size
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_note = ("peak RSS measured by GNU time" if GNU_TIME
                else f"RSS below {floor:.0f} MiB is the spawning parent's floor, not the tool's")
    print(f"\ninput {SRC.name}: {size / 2**30:.2f} GiB, medians of {args.reps} runs; {rss_note}")
    print(f"{'tool':<10}{'seconds':>10}{'x cp':>8}{'GB/s':>8}{'peak RSS MiB':>15}")
    for n, m in med.items():
        print(f"{n:<10}{m['seconds']:>10.2f}{m['seconds'] / med['cp']['seconds']:>8.2f}{size / m['seconds'] / 1e9:>8.2f}{m['peak_rss_mib']:>15.1f}")
    print(json.dumps({"input": str(SRC), "input_bytes": size, "reps": args.reps, "rss_floor_mib": floor, "median": med, "runs": runs}))


if __name__ == "__main__":
    main()
