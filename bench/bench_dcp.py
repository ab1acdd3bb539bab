"""Benchmark `ckptconv convert` on an 8-rank RLinf-style DCP checkpoint against `cp` and the torch pipeline.

Owns: bench/bench_dcp.py (its cache lives in the gitignored bench/data/). The input is generated once: a DCP
folder of the Qwen2-1.5B shapes of bench_pt.py (bf16, untied lm_head, ~3.55 GB of weights) saved by 8 gloo
processes, each holding only its Shard(0) rows (DTensor.from_local), under fsdp_checkpoint.model, with a bf16
exp_avg of every weight under fsdp_checkpoint.optimizers (same sharding) that the converters must skip.
Each repetition runs, interleaved: cp of one plain file holding exactly the model's bytes (the floor for
moving that much data); ckptconv convert <folder>; and torch's way (dcp_to_torch_save into a temporary .pt,
then torch.load(mmap=True), select fsdp_checkpoint.model, safetensors save_file), skipped without torch.
Timing and peak RSS use bench_pt.py's `timed` (GNU time when present); medians are printed, then JSON.

Run:  .venv/bin/python bench/bench_dcp.py [--reps 3] [--ckptconv target/release/ckptconv]
"""

import importlib.util
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pt import DATA, GNU_TIME, bench_args, interleaved, shapes  # noqa: E402  (no torch import: keeps the parent small)

RANKS = 8
SRC = DATA / f"qwen2_1.5b_untied_bf16_dcp{RANKS}"
MARKER = DATA / f"{SRC.name}.ok"
FLAT = DATA / "dcp_model_bytes.bin"  # cp's input: a plain file of exactly the model's byte count

TORCH_PIPELINE = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
tmp = Path(sys.argv[2]) / "full.pt"
dcp_to_torch_save(sys.argv[1], tmp)                        # model and optimizer state, as torch offers it
sd = torch.load(tmp, mmap=True, weights_only=False)["fsdp_checkpoint"]["model"]
save_file(sd, Path(sys.argv[2]) / "model.safetensors", metadata={"format": "pt"})
del sd
tmp.unlink()
"""


def model_bytes():
    return sum(2 * n for n in (prod(s) for _, s in shapes()))


def prod(shape):
    out = 1
    for d in shape:
        out *= d
    return out


def rank_job(rank, world, port):
    """One rank: build its Shard(0) rows of every weight and exp_avg locally, then dcp.save them together."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model, optim = {}, {}
    for i, (name, shape) in enumerate(shapes()):
        rows = -(-shape[0] // world)  # Shard(0) uses torch.chunk's split: ceil-sized pieces, short or empty last
        local = (min(shape[0], rows * (rank + 1)) - min(shape[0], rows * rank),) + tuple(shape[1:])
        stride = tuple(prod(shape[d + 1:]) for d in range(len(shape)))

        def piece(value):  # cheap non-zero fill: values don't matter, pages must be real
            t = torch.empty(local, dtype=torch.bfloat16).fill_(value)
            return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
        model[name] = piece(0.001 * (i % 997 + 1))
        optim[name] = {"exp_avg": piece(-0.0005 * (i % 991 + 1))}
    state = {"model": model, "optimizers": {"state": optim, "param_groups": [{"lr": 1e-6, "params": list(model)}]},
             "lr_schedulers": [{"last_epoch": 1}], "fsdp_version": 2}
    dcp.save({"fsdp_checkpoint": state}, checkpoint_id=SRC)
    dist.barrier()
    dist.destroy_process_group()


def generate():
    """Write SRC (8 ranks) and FLAT once; a marker with the folder's size guards against a half-written cache."""
    import socket

    import torch.multiprocessing as mp

    size = lambda: sum(p.stat().st_size for p in SRC.iterdir())
    if SRC.exists() and MARKER.exists() and MARKER.read_text() == str(size()) \
            and FLAT.exists() and FLAT.stat().st_size == model_bytes():
        return
    DATA.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(SRC, ignore_errors=True)
    MARKER.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_job, args=(RANKS, port), nprocs=RANKS, join=True)
    MARKER.write_text(str(size()))
    block = os.urandom(1 << 20)  # FLAT: real, incompressible pages of the model's exact size
    with open(FLAT, "wb") as f:
        left = model_bytes()
        while left:
            left -= f.write(block[:min(left, len(block))])
    print(f"generated {SRC} ({size() / 2**30:.2f} GiB, {RANKS} ranks) and {FLAT.name} ({model_bytes() / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - t0:.0f}s")


def header(path):
    """{name: (dtype, shape)} of a safetensors file, read without torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in h.items()}


def main():
    args = bench_args(__doc__, "out_dcp")
    if args.generate_only:
        return generate()

    # Generate in a child: the timing parent must stay small and never import torch (see bench_pt.py).
    subprocess.run([sys.executable, __file__, "--generate-only"], check=True)
    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    out = Path(args.out)
    want = {name: ("BF16", list(shape)) for name, shape in shapes()}
    tools = {
        "cp": lambda: ["cp", str(FLAT), str(out / "model.bin")],
        "ckptconv": lambda: [args.ckptconv, "convert", str(SRC), str(out)],
    }
    if have_torch:
        tools["torch"] = lambda: [sys.executable, "-c", TORCH_PIPELINE, str(SRC), str(out)]

    def check(name, rep, out):
        if name != "cp":  # both converters must write the model, and only the model
            files = sorted(out.glob("*.safetensors"))
            got = {k: v for f in files for k, v in header(f).items()}
            assert got == want, f"{name}: output tensors differ from the model's: {sorted(set(got) ^ set(want))[:5]}"

    runs = interleaved(tools, args.reps, out, check)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for n, rs in runs.items()}
    size, folder = model_bytes(), sum(p.stat().st_size for p in SRC.iterdir())
    rss_note = "peak RSS measured by GNU time" if GNU_TIME else "peak RSS from wait4 (includes the spawning parent's floor)"
    print(f"\ninput {SRC.name}: {folder / 2**30:.2f} GiB in {RANKS} ranks, of which model {size / 2**30:.2f} GiB; "
          f"medians of {args.reps} runs; {rss_note}")
    print(f"{'tool':<10}{'seconds':>10}{'x cp':>8}{'GB/s':>8}{'peak RSS MiB':>15}")
    for n, m in med.items():
        print(f"{n:<10}{m['seconds']:>10.2f}{m['seconds'] / med['cp']['seconds']:>8.2f}{size / m['seconds'] / 1e9:>8.2f}{m['peak_rss_mib']:>15.1f}")
    print(json.dumps({"input": str(SRC), "input_bytes": folder, "model_bytes": size, "ranks": RANKS, "reps": args.reps,
                      "median": med, "runs": runs}))


if __name__ == "__main__":
    main()
