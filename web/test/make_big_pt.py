"""Writes a Qwen2-shaped bf16 state dict with real torch.save, big enough (~400 MB) that a browser conversion lasts
long enough to screenshot, cancel or break mid-way. Values are per-tensor constants: only the bytes' volume matters.

Run: .venv/bin/python web/test/make_big_pt.py OUT.pt
"""

import sys

import torch

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 32000, 1024, 12, 16, 4, 2816


def shapes():
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


if __name__ == "__main__":
    sd = {n: torch.empty(s, dtype=torch.bfloat16).fill_(0.001 * (i % 997 + 1)) for i, (n, s) in enumerate(shapes())}
    torch.save(sd, sys.argv[1])
