"""Benchmark ckptconv's LoRA merge / adapter export on a Qwen2-1.5B-shaped bf16 PEFT checkpoint against the
plain (non-LoRA) conversion of the same model and a plain-torch merge.

Owns: bench/bench_lora.py (bench/data/ is a gitignored cache). Shapes, `timed` (GNU time peak RSS) and the
data folder come from bench_pt.py.
Inputs, generated once into bench/data/ (about 3.6 GB each):
  qwen2_1.5b_lora_r32_bf16.pt  PEFT state-dict names (base_model.model.<m>.base_layer.weight/.bias and
                               <m>.lora_A/lora_B.default.weight), LoRA r=32 on q,k,v,o,gate,up,down of all
                               28 layers, as RLinf's torch.save(model.state_dict()) writes it
  qwen2_1.5b_plain_bf16.pt     the same base tensors under plain HF names (what a non-LoRA run saves)
Base values are per-tensor constants (bench_pt's fill: values don't matter, pages must be real); LoRA A/B are
small seeded noise. alpha is left to ckptconv's default (alpha = r, RLinf's LoRA), the torch reference uses
the same scale.
Each repetition runs, interleaved so drift hits all tools alike: ckptconv convert of the plain file
("plain"); ckptconv convert --lora merge of the LoRA file ("merge"); --lora adapter ("adapter"); and, if torch
is importable, torch.load(mmap=True) + per-module W + s·B@A in f32 + safetensors save_file in a subprocess
("torch_merge"). `sync` runs before each timing; outputs are deleted between runs. After the timings (unless
--no-verify) a child process checks that ckptconv's merge and torch's agree (same names, <= 1 bf16 ulp).
Medians are printed with the merge overhead (merge / plain; the issue's target is <= 1.5), then JSON.

Run:  .venv/bin/python bench/bench_lora.py [--reps 3] [--ckptconv target/release/ckptconv] [--no-torch]
"""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pt import DATA, GNU_TIME, bench_args, interleaved, shapes  # noqa: E402  (bench_pt imports no torch at module level)

LORA_SRC = DATA / "qwen2_1.5b_lora_r32_bf16.pt"
PLAIN_SRC = DATA / "qwen2_1.5b_plain_bf16.pt"
RANK = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT = "base_model.model."

# The torch reference: no peft, just what a merge script does. addmm_ keeps the f32 accumulation in place;
# each result is rounded once to the base dtype.
TORCH_MERGE = """
import sys, torch
from safetensors.torch import save_file
P = "base_model.model."
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
out = {}
for k, v in sd.items():
    if ".lora_A." in k or ".lora_B." in k:
        continue
    name = k.removeprefix(P).replace(".base_layer.", ".")
    if k.endswith(".base_layer.weight"):
        m = k.removesuffix(".base_layer.weight")
        a, b = sd[m + ".lora_A.default.weight"], sd[m + ".lora_B.default.weight"]
        scale = 1.0  # alpha / r with alpha = r (RLinf's LoRA), the default ckptconv applies
        out[name] = v.float().addmm_(b.float(), a.float(), alpha=scale).to(v.dtype)
    else:
        out[name] = v
save_file(out, sys.argv[2], metadata={"format": "pt"})
"""

# Compare the two merges tensor by tensor through safe_open (one tensor at a time, so this child stays small).
VERIFY = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
def files(d):
    return sorted(Path(d).glob("*.safetensors"))
def opened(d):
    out = {}
    for f in files(d):
        h = safe_open(str(f), "pt")
        out.update({k: h for k in h.keys()})
    return out
a, b = opened(sys.argv[1]), opened(sys.argv[2])
assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))[:10]}"
worst, exact = 0, 0
for k in a:
    x, y = a[k].get_tensor(k), b[k].get_tensor(k)
    assert x.dtype == y.dtype and x.shape == y.shape, k
    if torch.equal(x, y):
        exact += 1
        continue
    ulps = (x.view(torch.int16).int() - y.view(torch.int16).int()).abs().max().item()
    worst = max(worst, ulps)
print(f"verify: {len(a)} tensors, {exact} bit-identical, worst difference {worst} bf16 ulp")
assert worst <= 1, f"ckptconv and torch merges differ by {worst} ulp"
"""


def lora_shapes():
    """(PEFT name, shape, None | "A" | "B") in the order PeftModel.state_dict() lists a LoRA'd Linear:
    base_layer.weight, base_layer.bias, lora_A, lora_B (a streaming merge sees the base before its factors)."""
    plain = dict(shapes())
    for name, shape in plain.items():
        mod, _, leaf = name.rpartition(".")
        if mod.rsplit(".", 1)[-1] not in TARGETS:
            yield PEFT + name, shape, None
        elif leaf == "weight":
            out_f, in_f = shape
            yield f"{PEFT}{mod}.base_layer.weight", shape, None
            if f"{mod}.bias" in plain:
                yield f"{PEFT}{mod}.base_layer.bias", plain[f"{mod}.bias"], None
            yield f"{PEFT}{mod}.lora_A.default.weight", (RANK, in_f), "A"
            yield f"{PEFT}{mod}.lora_B.default.weight", (out_f, RANK), "B"


def cached(path):
    marker = path.with_suffix(".ok")
    return path.exists() and marker.exists() and marker.read_text() == str(path.stat().st_size)


def save_marked(obj, path):
    """torch.save to a temp name, rename, then a marker with the size (guards a half-written cache)."""
    import torch

    tmp = path.with_suffix(".partial")
    torch.save(obj, tmp)
    tmp.rename(path)
    path.with_suffix(".ok").write_text(str(path.stat().st_size))


def generate():
    import torch

    if cached(LORA_SRC) and cached(PLAIN_SRC):
        return
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    base = {name: torch.empty(shape, dtype=torch.bfloat16).fill_(0.001 * (i % 997 + 1)) for i, (name, shape) in enumerate(shapes())}
    peft = {}
    for name, shape, kind in lora_shapes():
        if kind is None:
            peft[name] = base[name.removeprefix(PEFT).replace(".base_layer.", ".")]  # shared: no extra memory
        else:
            peft[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_marked(peft, LORA_SRC)
    save_marked(base, PLAIN_SRC)
    lora_params = sum(t.numel() for n, t in peft.items() if ".lora_" in n)
    print(f"generated {LORA_SRC.name} ({LORA_SRC.stat().st_size / 2**30:.2f} GiB, {lora_params / 1e6:.1f} M LoRA params) and "
          f"{PLAIN_SRC.name} ({PLAIN_SRC.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s")


def main():
    args = bench_args(__doc__, "out_lora", "skip the torch merge reference", extra=[
        ("--no-verify", dict(action="store_true", help="skip the ckptconv-vs-torch merge comparison"))])
    if args.generate_only:
        return generate()

    # Generate in a child: the timing parent must stay small and never import torch (a spawned child's
    # ru_maxrss can carry the parent's peak; see bench_pt.generate_in_child).
    subprocess.run([sys.executable, __file__, "--generate-only"], check=True)
    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    out = Path(args.out)
    ck = [args.ckptconv, "convert", "--quiet"]
    tools = {
        "plain": lambda: ck + [str(PLAIN_SRC), str(out)],
        "merge": lambda: ck + [str(LORA_SRC), str(out), "--lora", "merge"],
        "adapter": lambda: ck + [str(LORA_SRC), str(out), "--lora", "adapter"],
    }
    if have_torch:
        tools["torch_merge"] = lambda: [sys.executable, "-c", TORCH_MERGE, str(LORA_SRC), str(out / "model.safetensors")]
    plain_size = PLAIN_SRC.stat().st_size

    def check(name, rep, out):
        if name == "adapter":
            produced = (out / "lora_adapter" / "adapter_model.safetensors").stat().st_size
            assert not list(out.glob("*.safetensors")), "adapter mode wrote full weights"
        else:
            produced = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            assert produced >= plain_size * 0.9, f"{name} wrote only {produced} bytes"
        return {"bytes_written": produced}

    runs = interleaved(tools, args.reps, out, check)

    verified = None
    if have_torch and not args.no_verify:
        a, b = out / "ckptconv", out / "torch"
        for d in (a, b):
            d.mkdir(parents=True)
        subprocess.run(ck + [str(LORA_SRC), str(a), "--lora", "merge"], check=True)
        subprocess.run([sys.executable, "-c", TORCH_MERGE, str(LORA_SRC), str(b / "model.safetensors")], check=True)
        v = subprocess.run([sys.executable, "-c", VERIFY, str(a), str(b)], capture_output=True, text=True)
        verified = v.stdout.strip() or v.stderr.strip().splitlines()[-1]
        print(verified)
        shutil.rmtree(out, ignore_errors=True)
        if v.returncode != 0:
            raise SystemExit(f"merge verification failed:\n{v.stderr}")

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for n, rs in runs.items()}
    overhead = med["merge"]["seconds"] / med["plain"]["seconds"]
    lora_size = LORA_SRC.stat().st_size
    load = os.getloadavg()
    print(f"\ninputs: {LORA_SRC.name} {lora_size / 2**30:.2f} GiB, {PLAIN_SRC.name} {plain_size / 2**30:.2f} GiB; medians of "
          f"{args.reps} runs; peak RSS {'by GNU time' if GNU_TIME else 'by wait4 (includes the parent floor)'}; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'tool':<13}{'seconds':>10}{'x plain':>9}{'GB/s in':>9}{'peak RSS MiB':>15}")
    for n, m in med.items():
        size = plain_size if n == "plain" else lora_size
        print(f"{n:<13}{m['seconds']:>10.2f}{m['seconds'] / med['plain']['seconds']:>9.2f}{size / m['seconds'] / 1e9:>9.2f}{m['peak_rss_mib']:>15.1f}")
    print(f"merge overhead: merge / plain = {overhead:.2f} (target <= 1.50: {'met' if overhead <= 1.5 else 'NOT met'})")
    print(json.dumps({"lora_input": str(LORA_SRC), "lora_input_bytes": lora_size, "plain_input": str(PLAIN_SRC),
                      "plain_input_bytes": plain_size, "rank": RANK, "targets": TARGETS, "reps": args.reps,
                      "merge_over_plain": overhead, "verify": verified, "loadavg": load, "median": med, "runs": runs}))


if __name__ == "__main__":
    main()
