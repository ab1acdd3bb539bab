"""Benchmark `ckptconv convert --dtype bf16` on a multi-GB block-FP8 (DeepSeek-V3-style) sharded safetensors set against `cp` and a torch dequant pipeline.

Owns: bench/bench_fp8.py (its input is cached in the gitignored bench/data/). The run loop is bench_zero.py's.
The input is DeepSeek-V3's layer shapes (hidden 7168, MLA attention: q_a_proj [1536, 7168], q_b_proj [24576, 1536],
kv_a_proj_with_mqa [576, 7168] (a ragged 4.5-block edge, as in the release), kv_b_proj [32768, 512], o_proj
[7168, 16384]; dense MLP gate/up [18432, 7168], down [7168, 18432]; experts gate/up [2048, 7168], down [7168, 2048])
at reduced size: 3 dense layers (DeepSeek-V3's first_k_dense_replace) and one MoE layer with 48 routed experts and
one shared expert, without embedding and lm_head: about 4.1 GB of float8_e4m3fn weights, each with its fp32
`weight_scale_inv` [ceil(M/128), ceil(N/128)], plus bf16 norms and router and the fp32 e_score_correction_bias.
It is not a real model (random values), only real shapes, dtypes, names and layout: bench/data/fp8_dsv3_L4_E48/in/
holds model-0000k-of-00004.safetensors (greedy ~1.1 GB shards in model order, every weight beside its scale) +
model.safetensors.index.json + config.json (DeepSeek-V3's, at this depth, with quantization_config {quant_method
fp8, fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128]}); bench/data/fp8_dsv3_L4_E48/outsize.bin is
a file of the bf16 output's size (the input shards' bytes repeated), the `cp out-size` source.
Quantizer (quick blockwise, in torch): seeded N(0, 0.02) rows times a per-row factor exp(N(0, 0.5)) (so block scales
vary), per 128 x 128 block (edge blocks clipped) scale_inv = amax / 448, q = (w / scale_inv).to(float8_e4m3fn).
Generation writes ~12 GB (input + outsize.bin), ~1 min.

Tools, each run into an emptied scratch folder deleted after the run:
  cp in          cp -r of the input folder (the bytes ckptconv reads)
  cp out-size    cp of outsize.bin (the bytes ckptconv writes; bf16 output is 2x the FP8 input)
  ckptconv bf16  target/release/ckptconv convert IN OUT --dtype bf16 --quiet (dequantized, scales dropped)
  ckptconv keep  ... without --dtype (FP8 and scales copied as they are)
  torch          DeepSeek-V3's fp8_cast_bf16.py recipe on CPU in a subprocess: per shard safetensors load_file, every
                 FP8 weight w.float() * its scale expanded per block (repeat_interleave, edge cropped), .to(bf16),
                 every other float tensor .to(bf16), save_file per shard; config.json without quantization_config
Check on the first repetition (fatal if it fails): ckptconv bf16's and torch's outputs hold the same tensors,
names, dtypes, shapes and bytes (SHA-256 per tensor).
Modes, interleaved within every repetition (bench_zero.measure): hot = the tool's input read once, untimed (the input
folder; outsize.bin for cp out-size), `sync`, then the tool (no sync timed); disk = `sync`, page cache dropped (echo 3
> drop_caches, else posix_fadvise DONTNEED), the tool and its `sync` timed. Peak RSS is GNU time's %M. Also printed:
ckptconv's hot throughput in GB/s of output and of FP8 input. JSON in bench/data/fp8_dsv3_L4_E48_result.json.

Run:  .venv/bin/python bench/bench_fp8.py [--reps 3] [--modes hot,disk] [--experts 48] [--dense-layers 3] [--no-torch]
                                          [--ckptconv target/release/ckptconv]
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# None of these import torch at module level, so the timing parent stays small.
import bench_io  # noqa: E402
import bench_moe  # noqa: E402  (valid_marker, generated)
import bench_pt  # noqa: E402
import bench_zero  # noqa: E402  (measure, summarize, print_table, compare)
from bench_megatron import digests  # noqa: E402
from bench_pt import DATA, bench_args  # noqa: E402

bench_pt.RSS_FILE = bench_io.RSS_FILE = DATA / "rss_fp8.txt"  # our own (importing bench_zero set its own)
LOG = DATA / "bench_fp8.log"
SEED = 5000
BLOCK = 128
FP8_MAX = 448.0

# DeepSeek-V3 (config.json on the Hub) at 3 dense + 1 MoE layer, 48 routed experts.
DIMS = dict(hidden=7168, dense_layers=3, moe_layers=1, experts=48, shared=1, inter=18432, moe_inter=2048,
            q_lora=1536, kv_lora=512, heads=128, nope=128, rope=64, v_head=128, shard_bytes=1_100_000_000)

TORCH_PIPELINE = """
import json, os, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
cfg = json.load(open(os.path.join(src, "config.json")))
b0, b1 = cfg["quantization_config"]["weight_block_size"]
wm = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
new_map, total = {}, 0
for shard in sorted(set(wm.values())):
    sd = load_file(os.path.join(src, shard))
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            sk = k + "_scale_inv"
            if sk in sd:
                s = sd[sk]
            else:
                with safe_open(os.path.join(src, wm[sk]), "pt") as f:
                    s = f.get_tensor(sk)
            m, n = v.shape
            full = s.repeat_interleave(b0, 0)[:m].repeat_interleave(b1, 1)[:, :n]
            out[k] = (v.to(torch.float32) * full).to(torch.bfloat16)
            del full
        elif v.is_floating_point():
            out[k] = v.to(torch.bfloat16)
        else:
            out[k] = v
    del sd
    save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
    new_map.update({k: shard for k in out})
    total += sum(t.numel() * t.element_size() for t in out.values())
    del out
json.dump({"metadata": {"total_size": total}, "weight_map": new_map},
          open(os.path.join(dst, "model.safetensors.index.json"), "w"), indent=2, sort_keys=True)
cfg.pop("quantization_config")
cfg["torch_dtype"] = "bfloat16"
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2, sort_keys=True)
"""


def root_of(d):
    return DATA / f"fp8_dsv3_L{d['dense_layers'] + d['moe_layers']}_E{d['experts']}"


def tensors(d):
    """(name, shape, kind) in model order; kind: fp8 (quantized weight), bf16, norm (bf16 around 1), fp32."""
    H = d["hidden"]
    for layer in range(d["dense_layers"] + d["moe_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (H,), "norm"
        yield p + "self_attn.q_a_proj.weight", (d["q_lora"], H), "fp8"
        yield p + "self_attn.q_a_layernorm.weight", (d["q_lora"],), "norm"
        yield p + "self_attn.q_b_proj.weight", (d["heads"] * (d["nope"] + d["rope"]), d["q_lora"]), "fp8"
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (d["kv_lora"] + d["rope"], H), "fp8"
        yield p + "self_attn.kv_a_layernorm.weight", (d["kv_lora"],), "norm"
        yield p + "self_attn.kv_b_proj.weight", (d["heads"] * (d["nope"] + d["v_head"]), d["kv_lora"]), "fp8"
        yield p + "self_attn.o_proj.weight", (H, d["heads"] * d["v_head"]), "fp8"
        yield p + "post_attention_layernorm.weight", (H,), "norm"
        if layer < d["dense_layers"]:
            mlps = [p + "mlp."]
        else:
            yield p + "mlp.gate.weight", (d["experts"], H), "bf16"
            yield p + "mlp.gate.e_score_correction_bias", (d["experts"],), "fp32"
            mlps = [p + f"mlp.experts.{e}." for e in range(d["experts"])] + [p + "mlp.shared_experts."]
        for m in mlps:
            F = d["inter"] if layer < d["dense_layers"] else d["moe_inter"] * (d["shared"] if "shared" in m else 1)
            yield m + "gate_proj.weight", (F, H), "fp8"
            yield m + "up_proj.weight", (F, H), "fp8"
            yield m + "down_proj.weight", (H, F), "fp8"


def grid(shape):
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def quantize(name, shape):
    """(fp8 weight, fp32 weight_scale_inv) of a seeded random matrix, in bands of 8 block rows."""
    import torch
    import zlib

    g = torch.Generator().manual_seed(SEED * 1000003 + zlib.crc32(name.encode()))
    m, n = shape
    gm, gn = grid(shape)
    q = torch.empty(shape, dtype=torch.float8_e4m3fn)
    s = torch.empty((gm, gn), dtype=torch.float32)
    band = 8 * BLOCK
    for r in range(0, m, band):
        rows = min(band, m - r)
        w = torch.randn(rows, n, generator=g).mul_(0.02)
        w.mul_(torch.randn(rows, 1, generator=g).mul_(0.5).exp_())
        pad = torch.zeros(-(-rows // BLOCK) * BLOCK, gn * BLOCK)
        pad[:rows, :n] = w
        blocks = pad.view(-1, BLOCK, gn, BLOCK)
        amax = blocks.abs().amax(dim=(1, 3))
        sinv = (amax / FP8_MAX).clamp_(min=1e-12)
        s[r // BLOCK:r // BLOCK + sinv.shape[0]] = sinv
        q[r:r + rows] = (blocks / sinv[:, None, :, None]).view(pad.shape)[:rows, :n].to(torch.float8_e4m3fn)
    return q, s


def plain(name, shape, kind):
    import torch
    import zlib

    g = torch.Generator().manual_seed(SEED * 1000003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g).mul_(0.02)
    if kind == "norm":
        t.add_(1.0)
    return t.to(torch.float32 if kind == "fp32" else torch.bfloat16)


def config(d):
    """DeepSeek-V3's config.json (the Hub's), at this depth and expert count."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
        "first_k_dense_replace": d["dense_layers"], "hidden_act": "silu", "hidden_size": d["hidden"],
        "initializer_range": 0.02, "intermediate_size": d["inter"], "kv_lora_rank": d["kv_lora"],
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": d["moe_inter"],
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": d["experts"], "n_shared_experts": d["shared"],
        "norm_topk_prob": True, "num_attention_heads": d["heads"], "num_experts_per_tok": 8,
        "num_hidden_layers": d["dense_layers"] + d["moe_layers"], "num_key_value_heads": d["heads"],
        "num_nextn_predict_layers": 0, "q_lora_rank": d["q_lora"], "qk_nope_head_dim": d["nope"],
        "qk_rope_head_dim": d["rope"],
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [BLOCK, BLOCK]},
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": d["v_head"], "vocab_size": 129280}


def out_bytes(d):
    """Tensor bytes of the bf16 output: every tensor but the scales, 2 bytes per element."""
    n = 0
    for _, shape, _ in tensors(d):
        k = 1
        for x in shape:
            k *= x
        n += 2 * k
    return n


def generate(d):
    """Write the input folder, outsize.bin and a marker, once per dims."""
    from safetensors.torch import save_file

    root = root_of(d)
    if marker_ok(root, d):
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    src = root / "in"
    src.mkdir(parents=True)
    shards, names, cur, size = [], [], {}, 0
    fp8_bytes = total = 0

    def flush():
        nonlocal cur, size
        shards.append(src / f"shard{len(shards)}.partial")
        save_file(cur, shards[-1], metadata={"format": "pt"})
        names.append(list(cur))
        cur, size = {}, 0

    for name, shape, kind in tensors(d):
        if kind == "fp8":
            q, s = quantize(name, shape)
            group = {name: q, name + "_scale_inv": s}
            fp8_bytes += q.numel()
        else:
            group = {name: plain(name, shape, kind)}
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if cur and size + nbytes > d["shard_bytes"]:
            flush()
        cur.update(group)
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (path, keys) in enumerate(zip(shards, names), 1):
        final = src / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(final)
        weight_map.update({k: final.name for k in keys})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    (src / "config.json").write_text(json.dumps(config(d), indent=2, sort_keys=True) + "\n")
    # outsize.bin: the bf16 output's tensor bytes, from the input shards' bytes repeated (copy_file_range)
    want = out_bytes(d)
    files = input_files(root)
    with open(root / "outsize.bin", "wb") as dst:
        left = want
        while left:
            for f in files:
                with open(f, "rb") as fh:
                    n = min(left, os.fstat(fh.fileno()).st_size)
                    off = 0
                    while off < n:
                        k = os.copy_file_range(fh.fileno(), dst.fileno(), n - off, off)
                        assert k > 0
                        off += k
                    left -= n
                if not left:
                    break
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (root / "ok").write_text(json.dumps({
        "dims": d, "sizes": {str(f.relative_to(root)): f.stat().st_size for f in files + [root / "outsize.bin"]},
        "fp8_bytes": fp8_bytes, "input_tensor_bytes": total, "output_tensor_bytes": want,
        "generation_seconds": round(secs, 1), "generator_peak_rss_mib": round(peak)}))
    print(f"generated {root.name}: {sum(f.stat().st_size for f in files) / 1e9:.2f} GB in {len(shards)} shards "
          f"({fp8_bytes / 1e9:.2f} GB of FP8 weights), outsize.bin {want / 1e9:.2f} GB, in {secs:.0f}s, generator "
          f"peak RSS {peak:.0f} MiB", flush=True)


def input_files(root):
    return sorted((root / "in").glob("model-*.safetensors"))


def marker_ok(root, d):
    return bench_moe.valid_marker(root, d, input_files(root) + [root / "outsize.bin"])


def main():
    args = bench_args(__doc__, "out_fp8", torch_help="skip the torch dequant pipeline", extra=[
        ("--experts", dict(type=int, help=f"routed experts in the MoE layer (default {DIMS['experts']})")),
        ("--dense-layers", dict(type=int, help=f"dense layers (default {DIMS['dense_layers']})")),
        ("--modes", dict(default="hot,disk", help="hot, disk or both (default hot,disk)")),
        ("--dims", dict(help=argparse.SUPPRESS)),
    ])
    d = dict(DIMS)
    d.update({k: getattr(args, k) for k in ("experts", "dense_layers") if getattr(args, k) is not None})
    if args.generate_only:
        return generate(json.loads(args.dims))

    root = root_of(d)
    marker = bench_moe.generated(__file__, d, root, marker_ok)
    src, outsize = root / "in", root / "outsize.bin"
    files = input_files(root)
    size = sum(f.stat().st_size for f in files)
    out = Path(args.out)
    modes = args.modes.split(",")
    assert set(modes) <= {"hot", "disk"}, modes
    py, c = sys.executable, args.ckptconv
    tools = {
        "cp in": ["cp", "-r", str(src), str(out / "in")],
        "cp out-size": ["cp", str(outsize), str(out / "outsize.bin")],
        "ckptconv bf16": [c, "convert", str(src), str(out), "--dtype", "bf16", "--quiet"],
        "ckptconv keep": [c, "convert", str(src), str(out), "--quiet"],
    }
    if not args.no_torch:
        tools["torch"] = [py, "-c", TORCH_PIPELINE, str(src), str(out)]
    in_reads = [(f, None) for f in sorted(src.iterdir())]
    hot_reads = {n: ([(outsize, None)] if n == "cp out-size" else in_reads) for n in tools}
    print(f"input {root.name}: {size / 1e9:.2f} GB in {len(files)} shards ({marker['fp8_bytes'] / 1e9:.2f} GB FP8), "
          f"bf16 output {marker['output_tensor_bytes'] / 1e9:.2f} GB; generated in {marker['generation_seconds']:.0f}s; "
          f"{args.reps} reps of modes {modes}; load {bench_io.loadavg():.1f}", flush=True)
    LOG.write_text("")

    plans, checks = {}, []

    def check(name, rep, mode, out):
        if rep or mode != modes[0] or name not in ("ckptconv bf16", "torch"):
            return
        plans[name] = digests(out)
        if len(plans) == 2:
            checks.append(bench_zero.compare(plans.pop("ckptconv bf16"), plans.pop("torch"), "ckptconv bf16 vs torch"))
            print("check: " + checks[-1], flush=True)

    runs, drop_how = bench_zero.measure(tools, modes, args.reps, out, hot_reads, files + [outsize], check, LOG,
                                        resident_of={n: [p for p, _ in r] for n, r in hot_reads.items()})
    shutil.rmtree(out, ignore_errors=True)
    pairs = [("ckptconv bf16", "cp in"), ("ckptconv bf16", "cp out-size"), ("ckptconv keep", "cp in"),
             ("torch", "ckptconv bf16")]
    med, ratios = bench_zero.summarize(runs, modes, pairs)
    print(f"\n{root.name}: {size / 1e9:.2f} GB FP8 input, {marker['output_tensor_bytes'] / 1e9:.2f} GB bf16 output; "
          f"medians of {args.reps} reps; hot = input cached, no sync timed; disk = {drop_how}, sync timed")
    bench_zero.print_table(med, ratios, ["cp in", "cp out-size"])
    through = {}
    for mode in modes:
        if (mode, "ckptconv bf16") in med:
            m = med[(mode, "ckptconv bf16")]
            through[mode] = {"output_gb_per_s": m["written_bytes"] / m["seconds"] / 1e9,
                             "fp8_input_gb_per_s": size / m["seconds"] / 1e9,
                             "output_gb_per_cpu_s": m["written_bytes"] / m["cpu_seconds"] / 1e9}
            print(f"{mode}: ckptconv bf16 {through[mode]['output_gb_per_s']:.2f} GB/s of output "
                  f"({through[mode]['fp8_input_gb_per_s']:.2f} GB/s of input; "
                  f"{through[mode]['output_gb_per_cpu_s']:.2f} GB of output per CPU second)")
    result = {"input": str(root), "dims": d, "input_bytes": size, "fp8_bytes": marker["fp8_bytes"],
              "output_tensor_bytes": marker["output_tensor_bytes"], "generation_seconds": marker["generation_seconds"],
              "generator_peak_rss_mib": marker["generator_peak_rss_mib"], "reps": args.reps, "modes": modes,
              "page_cache_drop": drop_how, "ckptconv": c, "checks": checks, "throughput": through,
              "median": {f"{m}/{n}": v for (m, n), v in med.items()}, "ratios": ratios,
              "runs": {f"{m}/{n}": v for (m, n), v in runs.items()}}
    (DATA / f"{root.name}_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
