"""Benchmark how ckptconv's cost grows with tensor count on issue 18's inputs (HF shard sets, DeepSpeed ZeRO-3, FP8) against their reference pipelines.

Owns: bench/bench_scale_inputs.py (its inputs live in the gitignored bench/data/scale_inputs/). Like bench_scale.py
(issue #15, "Linear cost"), but for the input kinds of issue 18. Inputs, generated once per count by the real
libraries in a child process (the timing parent never imports torch), each with a marker against half-written caches:
  st_<k>k    a sharded safetensors set: model-0000k-of-0000N.safetensors (safetensors.torch.save_file) +
             model.safetensors.index.json, split by huggingface_hub.split_torch_state_dict_into_shards (what
             transformers' save_pretrained uses) at a sixth of the total (6-7 shards), + config.json
             (transformers' Qwen2MoeConfig at the depth the names need). Tensors: bench_scale.state(n): n float32 [16]
             with MoE names model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight (64 experts per layer)
  bin_<k>k   the same tensors as pytorch_model-0000k-of-0000N.bin (torch.save per shard) + pytorch_model.bin.index.json
  zero_<k>k  a DeepSpeed ZeRO-3 checkpoint, world size 2, in DeepSpeed 0.19.8's own file structure, taken from a real
             one: tests/fixtures/make_zero_fixtures.py --only zero3_fp32_w2 (engine.save_checkpoint, generated once
             into scale_inputs/zero3_template/). Both ranks' model-states and optim-states dicts are the template's
             (same keys, order, ZeroStageEnum, LossScaler, ds_config, ...) with the model-dependent entries rebuilt
             for a meta-device torch.nn model of n trainable nn.Linear weights (bench_scale.names(n); gate/up
             [4, 4], down [3, 5] = 15 elements, so every third parameter is padded), plus, as in the template, two
             persistent buffers (the template's model.ckpt_scale / model.ckpt_count values), a frozen
             model.embed_tokens.weight [127, 15] and lm_head.weight tied to it:
               module                  state_dict keys of that model (its _metadata too), each parameter an empty
                                       fp32 tensor of its own storage, lm_head's sharing the embedding's storage,
                                       the buffers with their values
               param_shapes            [OrderedDict(name -> torch.Size)] of the trainable parameters
               frozen_param_shapes     OrderedDict(embed -> torch.Size); frozen_param_fragments: this rank's
                                       ceil(numel / 2) elements of it (zeros past the end)
               shared_params           {"lm_head.weight": "model.embed_tokens.weight"} on rank 0, {} on rank 1
               fp32_flat_groups        [one flat fp32 tensor per rank], each parameter contributing ceil(numel / 2)
                                       elements (the last rank's tail zero-padded); the inner optimizer_state_dict's
                                       state[0] holds step, exp_avg, exp_avg_sq of the flat partition's size
             DeepSpeed accepts it: get_fp32_state_dict_from_zero_checkpoint loads every generated count, and what it
             returns (buffers, frozen embedding, n parameters, lm_head) equals the generator's values; its SHA-256
             per tensor (fp32 and cast to bf16) is stored beside the checkpoint and checked against ckptconv's output.
  fp8_<k>k   a block-FP8 set: n float8_e4m3fn weights [16, 16] (seeded N(0, 0.02) times a per-weight factor, scale_inv
             = amax / 448) each followed by its fp32 weight_scale_inv [1, 1], sharded as st_<k>k, config.json from
             transformers' DeepseekV3Config + quantization_config {fp8, e4m3, dynamic, weight_block_size [128, 128]}
Tools, per count (interleaved within every repetition; `sync` before each run; GNU time's %M for peak RSS; outputs
deleted between runs; the tools' own output goes to bench/data/bench_scale_inputs.log):
  ckptconv st / st bf16 / bin / zero / zero bf16 / fp8 bf16     target/release/ckptconv convert IN OUT [--dtype bf16] --quiet
  torch st [bf16]   transformers-style: safetensors.torch.load_file of every shard of the index, merged, [.to(bf16)],
                    save_file of the merged dict (+ config.json copied)
  torch bin         torch.load(shard, mmap=True, weights_only=True) of every shard, merged, save_file
  zero_to_fp32      python -m deepspeed.utils.zero_to_fp32 CKPT OUT: DeepSpeed's CLI. `--safe_serialization` refuses
                    the tied lm_head (safetensors: tensors share memory): tried once before the runs, its error recorded;
                    the timed runs write DeepSpeed's default pytorch_model.bin
  torch fp8 bf16    bench_fp8.TORCH_PIPELINE (DeepSeek-V3's fp8_cast_bf16.py recipe: per shard dequant + save_file)
Checks (not fatal; printed and in the JSON): every run's output tensor count (safetensors headers or the index; not
zero_to_fp32's single pytorch_model.bin, which needs torch to read); on the first repetition ckptconv's
output equals the reference's tensor for tensor (SHA-256; st, bin, fp8) or DeepSpeed's own get_fp32 result (zero);
ckptconv's config.json is there (and without quantization_config after the FP8 dequant).
Targets: the largest count's median <= 12x the smallest's when they are 10x apart (bench_scale's target), and ckptconv
faster than the reference at the largest count. Medians of --reps, then JSON.

Run:  .venv/bin/python bench/bench_scale_inputs.py [--reps 3] [--cases st,bin,zero,fp8] [--counts 10000,100000]
      [--no-torch] [--ckptconv target/release/ckptconv]
(generation ~1.5 min once for the default counts, ~1 min more for 25k + 50k; a repetition of everything ~2 min)
"""

import hashlib
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
# None of these import torch at module level, so the timing parent stays small.
import bench_pt  # noqa: E402
import bench_scale  # noqa: E402  (names, state)
from bench_megatron import digests  # noqa: E402
from bench_pt import DATA, GNU_TIME, REPO, bench_args  # noqa: E402
from bench_zero import output_to  # noqa: E402

bench_pt.RSS_FILE = DATA / "rss_scale_inputs.txt"  # our own (the imports set theirs)
ROOT = DATA / "scale_inputs"
LOG = DATA / "bench_scale_inputs.log"
TEMPLATE = ROOT / "zero3_template"
ZCASE = "zero3_fp32_w2"
WORLD = 2
SEED = 6000
TARGET_RATIO = 12
CASES = ("st", "bin", "zero", "fp8")
EMBED = (127, 15)  # the frozen, tied embedding of the ZeRO model (1905 elements: the last rank's fragment is padded)

TORCH_ST = """
import json, os, shutil, sys, torch
from safetensors.torch import load_file, save_file
src, dst, dtype = sys.argv[1:4]
wm = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
sd = {}
for shard in sorted(set(wm.values())):
    sd.update(load_file(os.path.join(src, shard)))
if dtype == "bf16":
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(src, "config.json"), dst)
"""

TORCH_BIN = """
import json, os, shutil, sys, torch
from safetensors.torch import save_file
src, dst = sys.argv[1:3]
wm = json.load(open(os.path.join(src, "pytorch_model.bin.index.json")))["weight_map"]
sd = {}
for shard in sorted(set(wm.values())):
    sd.update(torch.load(os.path.join(src, shard), map_location="cpu", mmap=True, weights_only=True))
save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(src, "config.json"), dst)
"""

ST_DTYPE = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.int64": "I64", "torch.float8_e4m3fn": "F8_E4M3"}


def folder(case, n):
    return ROOT / f"{case}_{n // 1000}k"


def zero_ckpt(n):
    return folder("zero", n) / "ckpt"


def layers_for(n):
    return -(-n // (64 * 3))


# --- generation (child process, torch) ---------------------------------------------------------------------------

def write_set(dst, sd, kind, config):
    """sd split as transformers' save_pretrained splits it (huggingface_hub) at a sixth of its bytes, written per
    shard by save_file (safetensors) or torch.save (bin), with the index and config.json."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in sd.values())
    pattern = "model{suffix}.safetensors" if kind == "st" else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(sd, filename_pattern=pattern, max_shard_size=-(-total // 6))
    assert split.is_sharded and 4 <= len(split.filename_to_tensors) <= 8, len(split.filename_to_tensors)
    for fname, names in split.filename_to_tensors.items():
        shard = {k: sd[k] for k in names}
        if kind == "st":
            save_file(shard, dst / fname, metadata={"format": "pt"})
        else:
            torch.save(shard, dst / fname)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    name = "model.safetensors.index.json" if kind == "st" else "pytorch_model.bin.index.json"
    (dst / name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.to_json_file(dst / "config.json")
    return len(split.filename_to_tensors)


def fresh(dst):
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)


def marked(dst):
    m = dst / "ok.json"
    return json.loads(m.read_text()) if m.exists() else None


def mark(dst, info):
    (dst / "ok.json").write_text(json.dumps(info))
    print(f"generated {dst.name}: {info}", flush=True)


def gen_sets(n, cases):
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(num_hidden_layers=layers_for(n), num_experts=64, hidden_size=16, intermediate_size=16,
                         moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, dtype="float32")
    sd = None
    for kind in ("st", "bin"):
        dst = folder(kind, n)
        if kind not in cases or marked(dst):
            continue
        t0 = time.perf_counter()
        sd = sd or bench_scale.state(n)
        fresh(dst)
        shards = write_set(dst, sd, kind, cfg)
        mark(dst, {"tensors": n, "shards": shards, "seconds": round(time.perf_counter() - t0, 1)})


def gen_fp8(n):
    import torch
    from transformers import DeepseekV3Config

    dst = folder("fp8", n)
    if marked(dst):
        return
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(SEED + n)
    w = torch.randn(n, 16, 16, generator=g) * 0.02 * torch.exp(0.5 * torch.randn(n, 1, 1, generator=g))
    scale = w.abs().amax(dim=(1, 2), keepdim=True) / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    sd = {}
    for i, name in enumerate(bench_scale.names(n)):
        sd[name] = q[i].clone()  # own storages: save_file refuses tensors sharing memory
        sd[name + "_scale_inv"] = scale[i].clone()
    cfg = DeepseekV3Config(num_hidden_layers=layers_for(n), n_routed_experts=64, first_k_dense_replace=0,
                           hidden_size=16, intermediate_size=16, moe_intermediate_size=16, dtype="bfloat16",
                           quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                "weight_block_size": [128, 128]})
    fresh(dst)
    shards = write_set(dst, sd, "st", cfg)
    assert "quantization_config" in json.loads((dst / "config.json").read_text())
    mark(dst, {"weights": n, "tensors": 2 * n, "shards": shards, "seconds": round(time.perf_counter() - t0, 1)})


def zero_template():
    """The real checkpoint's rank files: [(model_states, optim_states)] per rank, after checking the structure this
    generator mirrors (the lists of keys, the object types, the padding rule against zero_to_fp32's output)."""
    import torch
    from collections import OrderedDict

    case = TEMPLATE / ZCASE
    if not (case / "meta.json").exists():
        shutil.rmtree(TEMPLATE, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "tests/fixtures/make_zero_fixtures.py"), "--out", str(TEMPLATE),
                        "--only", ZCASE], check=True, stdout=subprocess.DEVNULL)
    step = case / "ckpt" / "global_step2"
    ranks = []
    for r in range(WORLD):
        m = torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)
        o = torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
        ranks.append((m, o))
    m, o = ranks[0]
    assert m["dp_world_size"] == WORLD and type(m["module"]) is OrderedDict
    assert type(m["param_shapes"]) is list and len(m["param_shapes"]) == 1 and type(m["param_shapes"][0]) is OrderedDict
    assert all(type(s) is torch.Size for s in m["param_shapes"][0].values())
    assert list(m["frozen_param_shapes"]) == ["model.embed_tokens.weight"]
    assert type(m["frozen_param_fragments"]) is OrderedDict
    assert m["buffer_names"] == ["model.ckpt_scale", "model.ckpt_count"]
    assert ranks[0][0]["shared_params"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert ranks[1][0]["shared_params"] == {}
    osd = o["optimizer_state_dict"]
    assert type(osd["zero_stage"]).__name__ == "ZeroStageEnum" and int(osd["zero_stage"]) == 3
    assert list(osd) == ["zero_stage", "loss_scaler", "dynamic_loss_scale", "overflow", "partition_count",
                         "optimizer_state_dict", "fp32_flat_groups"], list(osd)
    assert list(osd["optimizer_state_dict"]["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    # the per-parameter padding rule, against the real zero_to_fp32 output
    from safetensors.torch import load_file

    expected = load_file(case / "expected.safetensors")
    flats = [rk[1]["optimizer_state_dict"]["fp32_flat_groups"][0] for rk in ranks]
    off = 0
    for name, shape in m["param_shapes"][0].items():
        pn = -(-shape.numel() // WORLD)
        assert torch.equal(torch.cat([f[off:off + pn] for f in flats])[:shape.numel()].view(shape), expected[name])
        off += pn
    assert off == flats[0].numel()
    frag = [rk[0]["frozen_param_fragments"]["model.embed_tokens.weight"] for rk in ranks]
    emb = m["frozen_param_shapes"]["model.embed_tokens.weight"]
    assert all(f.numel() == -(-emb.numel() // WORLD) for f in frag)
    mod = m["module"]
    assert mod["lm_head.weight"].untyped_storage()._cdata == mod["model.embed_tokens.weight"].untyped_storage()._cdata
    return case, ranks


def zero_model(n):
    """A meta-device nn model: buffers ckpt_scale [7] / ckpt_count [5] on `model`, the frozen embedding, n trainable
    Linear weights under bench_scale.names(n), lm_head tied to the embedding."""
    import torch
    from torch import nn

    with torch.device("meta"):
        root = nn.Module()
        model = nn.Module()
        root.add_module("model", model)
        model.register_buffer("ckpt_scale", torch.empty(7))
        model.register_buffer("ckpt_count", torch.empty(5, dtype=torch.int64))
        model.add_module("embed_tokens", nn.Embedding(*EMBED))
        model.embed_tokens.weight.requires_grad_(False)
        mods = {"model": model}
        for name in bench_scale.names(n):
            parts = name.split(".")[:-1]  # the Linear's path
            for i in range(2, len(parts)):
                path = ".".join(parts[:i])
                if path not in mods:
                    mods[path] = nn.Module()
                    mods[".".join(parts[:i - 1])].add_module(parts[i - 1], mods[path])
            lin = nn.Linear(5, 3, bias=False) if parts[-1] == "down_proj" else nn.Linear(4, 4, bias=False)
            mods[".".join(parts[:-1])].add_module(parts[-1], lin)
        root.add_module("lm_head", nn.Linear(EMBED[1], EMBED[0], bias=False))
        root.lm_head.weight = model.embed_tokens.weight
    return root


def gen_zero(n):
    import torch
    from collections import OrderedDict

    root_dir = folder("zero", n)
    if marked(root_dir):
        return
    t0 = time.perf_counter()
    case, tranks = zero_template()
    fresh(root_dir)
    ckpt = zero_ckpt(n)
    tag = (case / "ckpt" / "latest").read_text().strip()
    step = ckpt / tag
    step.mkdir(parents=True)
    (ckpt / "latest").write_text((case / "ckpt" / "latest").read_text())
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        shutil.copy2(case / "ckpt" / script, ckpt / script)

    model = zero_model(n)
    sd = model.state_dict()
    params = [(k, p.shape) for k, p in model.named_parameters() if p.requires_grad]
    assert len(params) == n
    buffers = tranks[0][0]["module"]  # the template's buffer values
    g = torch.Generator().manual_seed(SEED + 7 * n)
    full = {k: torch.randn(s.numel(), generator=g) * 0.02 for k, s in params}
    embed = torch.randn(EMBED[0] * EMBED[1], generator=g) * 0.02
    pns = [-(-s.numel() // WORLD) for _, s in params]
    total = sum(pns)
    for r in range(WORLD):
        tm, to = tranks[r]
        module = OrderedDict()
        empty_embed = torch.empty(0)
        for k in sd:
            if k in tm["buffer_names"]:
                module[k] = buffers[k]
            elif k == "model.embed_tokens.weight":
                module[k] = empty_embed
            elif k == "lm_head.weight":
                module[k] = empty_embed.view(0)  # its own tensor on the embedding's storage, as DeepSpeed writes it
            else:
                module[k] = torch.empty(0)
        module._metadata = sd._metadata
        pe = -(-embed.numel() // WORLD)
        frag = torch.zeros(pe)
        part = embed[r * pe:(r + 1) * pe]
        frag[:part.numel()] = part
        states = dict(tm, module=module,
                      param_shapes=[OrderedDict(params)],
                      frozen_param_shapes=OrderedDict([("model.embed_tokens.weight", torch.Size(EMBED))]),
                      frozen_param_fragments=OrderedDict([("model.embed_tokens.weight", frag)]),
                      shared_params={"lm_head.weight": "model.embed_tokens.weight"} if r == 0 else {})
        assert list(states) == list(tm)
        torch.save(states, step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        flat = torch.zeros(total)
        off = 0
        for (k, s), pn in zip(params, pns):
            piece = full[k][r * pn:(r + 1) * pn]
            flat[off:off + piece.numel()] = piece
            off += pn
        tosd = to["optimizer_state_dict"]
        inner = dict(tosd["optimizer_state_dict"],
                     state={0: dict(tosd["optimizer_state_dict"]["state"][0], exp_avg=torch.randn(total, generator=g) * 1e-4,
                                    exp_avg_sq=torch.rand(total, generator=g) * 1e-8)})
        osd = dict(tosd, optimizer_state_dict=inner, fp32_flat_groups=[flat])
        assert list(osd) == list(tosd)
        torch.save(dict(to, optimizer_state_dict=osd), step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    written = time.perf_counter() - t0

    # DeepSpeed itself reads it back: names, order and values
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    t1 = time.perf_counter()
    with open(os.devnull, "w") as null:
        saved = os.dup(1)
        os.dup2(null.fileno(), 1)  # its progress lines and tqdm
        try:
            got = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    ds_seconds = time.perf_counter() - t1
    want = list(tranks[0][0]["buffer_names"]) + ["model.embed_tokens.weight"] + [k for k, _ in params] + ["lm_head.weight"]
    assert list(got) == want, "zero_to_fp32's names"
    for k, s in params:
        assert torch.equal(got[k], full[k].view(s)), k
    assert torch.equal(got["model.embed_tokens.weight"], embed.view(EMBED))
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    for k in tranks[0][0]["buffer_names"]:
        assert torch.equal(got[k], buffers[k].float() if buffers[k].is_floating_point() else buffers[k])

    def sha(t):
        return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        exp = {}
        for k, v in got.items():
            v = v.to(dt) if dt is not None and v.is_floating_point() else v
            exp[k] = [ST_DTYPE[str(v.dtype)], list(v.shape), sha(v)]
        (root_dir / f"expected_{name}.json").write_text(json.dumps(exp))
    sizes = {p.name: p.stat().st_size for p in sorted(step.iterdir())}
    mark(root_dir, {"parameters": n, "state_dict_tensors": len(got), "files": sizes, "seconds": round(written, 1),
                    "deepspeed_get_fp32_seconds": round(ds_seconds, 1), "deepspeed_accepts": True})


def generate(counts, cases):
    ROOT.mkdir(parents=True, exist_ok=True)
    for n in counts:
        gen_sets(n, cases)
        if "fp8" in cases:
            gen_fp8(n)
        if "zero" in cases:
            gen_zero(n)


# --- the runs (parent, no torch) ---------------------------------------------------------------------------------

def tools_for(args, counts, cases):
    """{name: (argv, expected output tensor count, case, count)}; every tool writes into args.out."""
    out, py = str(args.out), sys.executable
    refs = not args.no_torch
    if refs and "fp8" in cases:
        import bench_fp8  # noqa: E402  (its TORCH_PIPELINE; no torch at import)

    def ckptconv(src, *flags):
        return [args.ckptconv, "convert", str(src), out, *flags, "--quiet"]

    tools = {}
    for n in counts:
        k = f"{n // 1000}k"
        st, bn, fp, ck = folder("st", n), folder("bin", n), folder("fp8", n), zero_ckpt(n)
        zt = n + 4  # 2 buffers, the frozen embedding, n parameters, the tied lm_head
        bf16 = ("--dtype", "bf16")
        if "st" in cases:
            tools[f"ckptconv st{k}"] = (ckptconv(st), n, "st", n)
            tools[f"ckptconv st{k} bf16"] = (ckptconv(st, *bf16), n, "st bf16", n)
            if refs:
                tools[f"torch st{k}"] = ([py, "-c", TORCH_ST, str(st), out, "keep"], n, "st", n)
                tools[f"torch st{k} bf16"] = ([py, "-c", TORCH_ST, str(st), out, "bf16"], n, "st bf16", n)
        if "bin" in cases:
            tools[f"ckptconv bin{k}"] = (ckptconv(bn), n, "bin", n)
            if refs:
                tools[f"torch bin{k}"] = ([py, "-c", TORCH_BIN, str(bn), out], n, "bin", n)
        if "zero" in cases:
            tools[f"ckptconv zero{k}"] = (ckptconv(ck), zt, "zero", n)
            tools[f"ckptconv zero{k} bf16"] = (ckptconv(ck, *bf16), zt, "zero bf16", n)
            if refs:
                tools[f"zero_to_fp32 zero{k}"] = ([py, "-m", "deepspeed.utils.zero_to_fp32", str(ck), out], zt, "zero", n)
        if "fp8" in cases:
            tools[f"ckptconv fp8{k} bf16"] = (ckptconv(fp, *bf16), n, "fp8 bf16", n)
            if refs:
                tools[f"torch fp8{k} bf16"] = ([py, "-c", bench_fp8.TORCH_PIPELINE, str(fp), out], n, "fp8 bf16", n)
    return tools


def output_count(out):
    """Tensors in the output: safetensors headers, else a torch index's weight_map, else None (one .bin)."""
    files = sorted(out.glob("*.safetensors"))
    if files:
        return sum(bench_scale.safetensors_count(f) for f in files)
    idx = out / "pytorch_model.bin.index.json"
    if idx.exists():
        return len(json.loads(idx.read_text())["weight_map"])
    return None


def probe_safe_serialization(n):
    """zero_to_fp32 --safe_serialization once, on the smallest ZeRO input: (exit code, last stderr line)."""
    out = DATA / "out_scale_inputs_probe"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(zero_ckpt(n)), str(out),
                        "--safe_serialization"], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = [line.strip() for line in p.stderr.splitlines() if line.strip() and "it/s]" not in line]
    at = max((i for i, line in enumerate(lines) if line.startswith(("RuntimeError", "ValueError"))), default=None)
    return p.returncode, (" ".join(lines[at:at + 2]) if at is not None else (lines or [""])[-1])[:300]


def main():
    args = bench_args(__doc__, "out_scale_inputs", torch_help="skip the reference pipelines", extra=[
        ("--cases", {"default": ",".join(CASES), "help": "comma-separated subset of st,bin,zero,fp8"}),
        ("--counts", {"default": "10000,100000", "help": "comma-separated tensor counts (smallest first)"}),
    ])
    counts = sorted(int(x) for x in args.counts.split(","))
    cases = [c for c in args.cases.split(",") if c]
    assert set(cases) <= set(CASES), cases
    if args.generate_only:
        return generate(counts, cases)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate-only", "--cases", args.cases, "--counts", args.counts],
                   check=True)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s", flush=True)
    args.out = Path(args.out)
    tools = tools_for(args, counts, cases)
    probe = probe_safe_serialization(counts[0]) if "zero" in cases and not args.no_torch else None
    if probe:
        print(f"zero_to_fp32 --safe_serialization on zero{counts[0] // 1000}k: exit {probe[0]}: {probe[1]}", flush=True)

    notes = []
    first = {}

    def check(name, rep, out):
        _, want, case, n = tools[name]
        got = output_count(out)
        row = {"tensors": got}
        if got is not None and got != want:
            notes.append(f"{name} rep {rep + 1}: {got} tensors, expected {want}")
        if rep == 0 and name.startswith("ckptconv"):
            if not (out / "config.json").exists() and case != "zero" and case != "zero bf16":
                notes.append(f"{name}: no config.json in the output")
            cfg = out / "config.json"
            if case == "fp8 bf16" and cfg.exists() and "quantization_config" in json.loads(cfg.read_text()):
                notes.append(f"{name}: config.json keeps quantization_config")
        if rep == 0 and case.startswith("zero") and name.startswith("ckptconv"):
            exp = json.loads((folder("zero", n) / f"expected_{'bf16' if 'bf16' in case else 'fp32'}.json").read_text())
            mine = {k: [d, list(s), h] for k, (d, s, h) in digests(out).items()}
            if mine != exp:
                diff = sorted(set(mine) ^ set(exp))[:5] or [k for k in exp if mine.get(k) != exp[k]][:5]
                notes.append(f"{name}: differs from DeepSpeed's get_fp32_state_dict_from_zero_checkpoint: {diff}")
            else:
                row["same_as_deepspeed"] = True
        elif rep == 0 and not case.startswith("zero"):
            first[name] = digests(out)
        return row

    runs = {name: [] for name in tools}
    width = max(map(len, tools)) + 1
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}: load {os.getloadavg()[0]:.2f}", flush=True)
        for name, (argv, *_rest) in tools.items():
            shutil.rmtree(args.out, ignore_errors=True)
            args.out.mkdir(parents=True)
            try:
                with output_to(LOG):
                    secs, rss = bench_pt.timed(argv)
            except SystemExit as e:
                notes.append(f"{name} rep {rep + 1}: failed ({e}); see {LOG}")
                print(f"rep {rep + 1}/{args.reps}  {name:<{width}} FAILED (see {LOG})", flush=True)
                continue
            row = {"seconds": secs, "peak_rss_mib": rss, "load1": os.getloadavg()[0], **check(name, rep, args.out)}
            runs[name].append(row)
            print(f"rep {rep + 1}/{args.reps}  {name:<{width}} {secs:7.2f} s  {rss:8.1f} MiB  {row['tensors']} tensors",
                  flush=True)
    shutil.rmtree(args.out, ignore_errors=True)

    # first-repetition comparisons: ckptconv against the reference, tensor for tensor
    for name in list(first):
        if not name.startswith("ckptconv"):
            continue
        ref = "torch" + name[len("ckptconv"):]
        if ref in first:
            same = first[name] == first[ref]
            if not same:
                diff = sorted(set(first[name]) ^ set(first[ref]))[:5] or [
                    k for k in first[ref] if first[name].get(k) != first[ref][k]][:5]
                notes.append(f"{name} != {ref}: {diff}")
            runs[name][0]["same_as_reference"] = same

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")}
           for n, rs in runs.items() if rs}
    rss_note = "peak RSS by GNU time" if GNU_TIME else "peak RSS by wait4 (includes the spawning parent's floor)"
    print(f"\nmedians of {args.reps} runs; {rss_note}; load now {os.getloadavg()}")
    print(f"{'run':<28}{'tensors':>9}{'seconds':>10}{'peak RSS MiB':>15}")
    for name, m in med.items():
        print(f"{name:<28}{str(runs[name][0]['tensors']):>9}{m['seconds']:>10.2f}{m['peak_rss_mib']:>15.1f}")
    verdict = {}
    lo, hi = counts[0], counts[-1]
    by = {(name.split(" ")[0], tools[name][2], tools[name][3]): name for name in med}
    for (tool, case, n), name in by.items():
        if n != lo or (tool, case, hi) not in by or hi == lo:
            continue
        big = by[(tool, case, hi)]
        ratio = med[big]["seconds"] / med[name]["seconds"]
        steps = [round(med[by[(tool, case, m)]]["seconds"] / med[name]["seconds"], 2) for m in counts
                 if (tool, case, m) in by]
        v = verdict[f"{tool} {case}"] = {"ratio": round(ratio, 2), "count_ratio": hi / lo, "per_count": steps}
        if tool == "ckptconv" and hi == 10 * lo:
            v["ratio_met"] = ratio <= TARGET_RATIO
        print(f"{tool + ' ' + case:<24} {hi // 1000}k/{lo // 1000}k: {ratio:6.2f}x  (time / {lo // 1000}k's at "
              f"{', '.join(str(m // 1000) + 'k' for m in counts)}: {steps})" + (
                  f"  target <= {TARGET_RATIO}x: {'met' if v['ratio_met'] else 'NOT met'}" if "ratio_met" in v else ""))
    for (tool, case, n), name in by.items():
        if tool != "ckptconv" or n != hi:
            continue
        for (rtool, rcase, rn), ref in by.items():
            if rtool == "ckptconv" or rcase != case or rn != hi:
                continue
            ours, theirs = med[name]["seconds"], med[ref]["seconds"]
            verdict[f"{name} vs {ref}"] = {"faster": ours < theirs, "speedup": round(theirs / ours, 2)}
            print(f"{name} {ours:.2f} s vs {ref} {theirs:.2f} s: {theirs / ours:.1f}x "
                  f"{'faster' if ours < theirs else 'SLOWER'}")
    for note in notes:
        print("NOTE:", note)
    inputs = {f"{c}_{n // 1000}k": marked(folder(c, n)) for c in cases for n in counts}
    print(json.dumps({"reps": args.reps, "counts": counts, "median": med, "verdict": verdict, "notes": notes,
                      "zero_to_fp32_safe_serialization_probe": probe, "inputs": inputs, "runs": runs}))


if __name__ == "__main__":
    main()
