"""Writes a Qwen2-shaped bf16 state dict with real torch.save, big enough (~400 MB) that a browser conversion lasts
long enough to screenshot, cancel or break mid-way. Values are per-tensor constants: only the bytes' volume matters.

Run: .venv/bin/python web/test/make_big_pt.py OUT.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_pt import shapes as qwen2_shapes  # noqa: E402  (one definition of the Qwen2 layout)


def shapes():
    return qwen2_shapes(vocab=32000, hidden=1024, layers=12, heads=16, kv_heads=4, inter=2816)


if __name__ == "__main__":
    sd = {n: torch.empty(s, dtype=torch.bfloat16).fill_(0.001 * (i % 997 + 1)) for i, (n, s) in enumerate(shapes())}
    torch.save(sd, sys.argv[1])
