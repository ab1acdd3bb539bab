"""Benchmark `ckptconv mg2hf` on a Qwen2-1.5B-shaped bf16 TP=2 Megatron checkpoint (legacy or torch_dist) against `cp` and torch.

Owns: bench/bench_megatron.py (bench/data/ is a gitignored cache).
The input is generated once into bench/data/megatron_qwen2_1.5b_tp2/: actor/latest_checkpointed_iteration.txt,
actor/iter_0000001/mp_rank_0{0,1}/model_optim_rng.pt (~1.78 GB each) and base_hf/config.json. It needs no
megatron-core: the key names, key order and the args Namespace are taken from the committed real fixture
tests/fixtures/megatron/qwen2_tp2 (megatron-core's local spec), and every shape comes from one rule that is
first checked against that fixture's real shapes. Values are cheap per-tensor constants (identical on both
ranks, so replicated norms agree). Vocab 151936 is padded to 152064 (make_vocab_size_divisible_by 128 x TP 2).

Each repetition runs, interleaved so drift hits all tools alike: cp of one file as large as both rank files
(created once by concatenating them); ckptconv mg2hf; and, if torch is importable, the torch pipeline
(torch.load(mmap=True) of both ranks, merge_to_hf from the fixture script = the FORMATS.md §3 rules, safetensors
save_file) in a subprocess. `sync` runs before each timing; outputs are deleted between runs. Wall time and peak
RSS (GNU time's %M when /usr/bin/time exists, else wait4) are recorded; medians are printed, then JSON. The first
repetition also checks that ckptconv and torch wrote the same tensor names, dtypes and shapes.

--format torch_dist benchmarks the same model saved as a megatron-core distributed checkpoint (`--ckpt-format
torch_dist`, --no-save-optim) instead. Its input, generated once into bench/data/megatron_qwen2_1.5b_tp2_dist/
(about 3.5 GB, a few minutes and ~2.5 GB of RSS per rank), is written BY megatron-core itself, with the machinery of
tests/fixtures/make_megatron_fixtures.py (cpu_patches, build_model, save_dist): a real local-spec GPTModel of
these dims with bf16 parameters (wrapped in Float16Module as megatron.training does), randomly initialised
(use_cpu_initialization, the same seed on both ranks), built in 2 gloo processes (TP=2) on CPU and saved with
dist_checkpointing.save into actor_dist/iter_0000001/ (.metadata, __<rank>_<n>.distcp, common.pt,
metadata.json; common.pt's args are the fixture script's, e.g. max_position_embeddings 128, which mg2hf does not
read), beside the same base_hf/config.json as the legacy input. cp copies one file as large as the .distcp files
(their concatenation); the torch pipeline reads the folder with plain torch (load_dist: torch.distributed.checkpoint
in one process), un-stacks the layers (dist_to_legacy) and merges with the same merge_to_hf, then save_file. The
first repetition also checks that ckptconv and torch wrote the same tensors: names, dtypes, shapes and bytes
(a SHA-256 per tensor).

Run:  .venv/bin/python bench/bench_megatron.py [--reps 3] [--ckptconv target/release/ckptconv]
                                               [--format {legacy,torch_dist}]
"""

import hashlib
import importlib.util
import json
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_pt  # noqa: E402  (bench_pt imports no torch at module level)
from bench_pt import DATA, GNU_TIME, REPO, bench_args, interleaved  # noqa: E402

bench_pt.RSS_FILE = DATA / "rss_megatron.txt"  # timed() reads it at call time: our own, so a concurrent bench cannot clobber it

ROOT = DATA / "megatron_qwen2_1.5b_tp2"
ACTOR = ROOT / "actor"
ITER = ACTOR / "iter_0000001"
BASE = ROOT / "base_hf"
CP_SRC = DATA / "megatron_qwen2_1.5b_tp2_bytes.bin"
FIXTURE = REPO / "tests" / "fixtures" / "megatron" / "qwen2_tp2"
TP = 2

# --format torch_dist: save_dist writes <root>/actor_dist/iter_0000001/
DIST_ROOT = DATA / "megatron_qwen2_1.5b_tp2_dist"
DIST_ACTOR = DIST_ROOT / "actor_dist"
DIST_ITER = DIST_ACTOR / "iter_0000001"
DIST_BASE = DIST_ROOT / "base_hf"
DIST_CP_SRC = DATA / "megatron_qwen2_1.5b_tp2_dist_bytes.bin"
DIST_SEED = 1234

# DeepSeek-R1-Distill-Qwen-1.5B (RLinf's model): Qwen2-1.5B shapes, untied lm_head, bf16.
DIMS = dict(hidden=1536, layers=28, heads=12, groups=2, kv_channels=128, ffn=8960, vocab=151936, divisible=128)

TORCH_PIPELINE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from make_megatron_fixtures import load_ranks, merge_to_hf
from safetensors.torch import save_file
ranks = load_ranks(sys.argv[2], mmap=True)
cfg = json.load(open(sys.argv[3]))
save_file(merge_to_hf(ranks, cfg), sys.argv[4], metadata={"format": "pt"})
"""

TORCH_PIPELINE_DIST = """
import json, sys
sys.path.insert(0, sys.argv[1])
from make_megatron_fixtures import dist_to_legacy, load_dist, merge_to_hf
from safetensors.torch import save_file
cfg = json.load(open(sys.argv[3]))
save_file(merge_to_hf(dist_to_legacy(*load_dist(sys.argv[2], model_only=True)), cfg), sys.argv[4],
          metadata={"format": "pt"})
"""


def padded_vocab(d, tp):
    mult = d["divisible"] * tp
    return -(-d["vocab"] // mult) * mult


def shape_of(key, d, tp):
    """Per-rank shape of a megatron-core local-spec GPT tensor (swiglu, GQA, qkv bias, no linear bias)."""
    qkv_rows = (d["heads"] + 2 * d["groups"]) * d["kv_channels"]
    suffix = key.split("decoder.layers.")[-1].split(".", 1)[-1] if "decoder.layers." in key else key
    return {
        "embedding.word_embeddings.weight": (padded_vocab(d, tp) // tp, d["hidden"]),
        "output_layer.weight": (padded_vocab(d, tp) // tp, d["hidden"]),
        "decoder.final_layernorm.weight": (d["hidden"],),
        "input_layernorm.weight": (d["hidden"],),
        "pre_mlp_layernorm.weight": (d["hidden"],),
        "self_attention.linear_qkv.weight": (qkv_rows // tp, d["hidden"]),
        "self_attention.linear_qkv.bias": (qkv_rows // tp,),
        "self_attention.linear_proj.weight": (d["hidden"], d["heads"] * d["kv_channels"] // tp),
        "mlp.linear_fc1.weight": (2 * d["ffn"] // tp, d["hidden"]),
        "mlp.linear_fc2.weight": (d["hidden"], d["ffn"] // tp),
    }[suffix]


def write_base(folder):
    """base_hf/config.json: the real fixture's Qwen2 config with DeepSeek-R1-Distill-Qwen-1.5B's dims and real vocab."""
    cfg = json.loads((FIXTURE / "base_hf" / "config.json").read_text())
    cfg.update(hidden_size=DIMS["hidden"], intermediate_size=DIMS["ffn"], num_attention_heads=DIMS["heads"],
               num_key_value_heads=DIMS["groups"], num_hidden_layers=DIMS["layers"], max_window_layers=21,
               vocab_size=DIMS["vocab"], torch_dtype="bfloat16", max_position_embeddings=131072,
               bos_token_id=151643, eos_token_id=151643, rope_theta=1000000.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def concat(files, dst):
    """One file holding the bytes of `files` back to back (real pages, same size as the input): the cp baseline."""
    with open(dst, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, out, 64 << 20)


def template():
    """The real fixture's rank-0 checkpoint, and its dims (read back from its own args)."""
    import torch

    ckpt = torch.load(FIXTURE / "actor" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a = ckpt["args"]
    cfg = json.loads((FIXTURE / "base_hf" / "config.json").read_text())
    d = dict(hidden=a.hidden_size, layers=a.num_layers, heads=a.num_attention_heads, groups=a.num_query_groups,
             kv_channels=a.kv_channels, ffn=a.ffn_hidden_size, vocab=cfg["vocab_size"],
             divisible=a.make_vocab_size_divisible_by)
    assert a.tensor_model_parallel_size == TP and padded_vocab(d, TP) == a.padded_vocab_size
    for k, v in ckpt["model"].items():  # the shape rule must reproduce what megatron-core really wrote
        if torch.is_tensor(v):
            assert tuple(v.shape) == shape_of(k, d, TP), f"shape rule wrong for {k}: {tuple(v.shape)}"
    return ckpt, cfg


def layer_keys(model_keys, n_layers, block=None):
    """The fixture's key order, with its layer-0 block (or `block`, the keys of one layer after
    "decoder.layers.N.") repeated for every layer of the big model."""
    if block is None:
        block = [k[len("decoder.layers.0."):] for k in model_keys if k.startswith("decoder.layers.0.")]
    out, done = [], False
    for k in model_keys:
        if not k.startswith("decoder.layers."):
            out.append(k)
        elif not done:
            out += [f"decoder.layers.{i}.{s}" for i in range(n_layers) for s in block]
            done = True
    return out


def generate():
    """Write the two rank files, the tracker file, base_hf/config.json and the cp source, once. A marker with
    the expected sizes guards against a half-written cache."""
    import torch

    marker = ROOT / "ok"
    files = [ITER / f"mp_rank_{r:02d}" / "model_optim_rng.pt" for r in range(TP)]
    if marker.exists() and CP_SRC.exists() and all(f.exists() for f in files):
        if marker.read_text() == json.dumps([f.stat().st_size for f in files] + [CP_SRC.stat().st_size]):
            return
    shutil.rmtree(ROOT, ignore_errors=True)
    t0 = time.perf_counter()
    tmpl, cfg = template()
    keys = layer_keys(list(tmpl["model"]), DIMS["layers"])
    for r in range(TP):
        model = {}
        for i, k in enumerate(keys):
            src_key = k if k in tmpl["model"] else "decoder.layers.0." + k.split(".", 3)[3]
            if not torch.is_tensor(tmpl["model"][src_key]):
                model[k] = tmpl["model"][src_key]  # _extra_state: None, as megatron-core writes it
                continue
            # Cheap, non-zero fill: a per-key constant (same on both ranks, so replicated norms agree).
            model[k] = torch.empty(shape_of(k, DIMS, TP), dtype=torch.bfloat16).fill_(0.001 * (i % 997 + 1))
        args = tmpl["args"]
        vars(args).update(
            num_layers=DIMS["layers"], encoder_num_layers=DIMS["layers"], hidden_size=DIMS["hidden"],
            ffn_hidden_size=DIMS["ffn"], num_attention_heads=DIMS["heads"], num_query_groups=DIMS["groups"],
            kv_channels=DIMS["kv_channels"], make_vocab_size_divisible_by=DIMS["divisible"],
            padded_vocab_size=padded_vocab(DIMS, TP), params_dtype=torch.bfloat16, bf16=True, fp16=False,
            rotary_base=1000000, max_position_embeddings=131072, seq_length=4096, rank=r, local_rank=r)
        ckpt = dict(tmpl, model=model, args=args)
        files[r].parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, files[r])
        del ckpt, model
    (ACTOR / "latest_checkpointed_iteration.txt").write_text("1")
    write_base(BASE)
    concat(files, CP_SRC)
    marker.write_text(json.dumps([f.stat().st_size for f in files] + [CP_SRC.stat().st_size]))
    total = sum(f.stat().st_size for f in files)
    print(f"generated {ROOT} ({total / 2**30:.2f} GiB in {TP} rank files) in {time.perf_counter() - t0:.0f}s")


def dist_spec():
    """The fixture script's spec() dict (the keys build_model and save_dist read) for DIMS at TP=2, bf16."""
    from make_megatron_fixtures import FAMILIES

    return dict(FAMILIES["qwen2"], family="qwen2", tp=TP, pp=1, dtype="bfloat16", tied=False,
                hidden=DIMS["hidden"], layers=DIMS["layers"], heads=DIMS["heads"], groups=DIMS["groups"],
                kv_channels=DIMS["kv_channels"], ffn=DIMS["ffn"], vocab=DIMS["vocab"], divisible=DIMS["divisible"],
                padded_vocab=padded_vocab(DIMS, TP), rope_theta=1000000.0, eps=1e-6, seed=DIST_SEED)


def _dist_rank(rank, world, port, root, s):
    """One megatron rank (torch.multiprocessing.spawn target), as the fixture script's _rank_main + build_case
    do it, minus the legacy save and the forward: build the GPTModel, save it as torch_dist, report peak RSS."""
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # "Apex/TE not installed"
    import make_megatron_fixtures as mf
    from megatron.core import parallel_state as ps

    with mf.rank_process(rank, world, port):
        ps.initialize_model_parallel(tensor_model_parallel_size=s["tp"], pipeline_model_parallel_size=s["pp"])
        torch.manual_seed(s["seed"])  # same master weights on every rank (use_cpu_initialization slices them)
        t0 = time.perf_counter()
        model = mf.build_model(s, torch.bfloat16)
        built = time.perf_counter() - t0
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        mf.save_dist(root, s, model, rank, world, ps.get_tensor_model_parallel_rank(),
                     ps.get_pipeline_model_parallel_rank())
        dist.barrier()
        ps.destroy_model_parallel()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the writer processes it forked
    print(f"rank {rank}: model built in {built:.0f}s, saved in {time.perf_counter() - t0 - built:.0f}s; "
          f"peak RSS {own:.0f} MiB (its writer processes: {kids:.0f} MiB)", flush=True)


def dist_files():
    return sorted(p for p in DIST_ITER.iterdir() if p.is_file()) if DIST_ITER.is_dir() else []


def generate_dist():
    """Have megatron-core write the torch_dist checkpoint (2 ranks), base_hf/config.json and the cp source, once.
    A marker with every file's size and the spec guards against a half-written or outdated cache."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import make_megatron_fixtures as mf

    marker = DIST_ROOT / "ok"

    def sizes():
        return json.dumps({"spec": dist_spec(), "sizes": {p.name: p.stat().st_size for p in dist_files() + [DIST_CP_SRC]}})

    if marker.exists() and DIST_CP_SRC.exists() and (DIST_BASE / "config.json").exists():
        if marker.read_text() == sizes():
            return
    shutil.rmtree(DIST_ROOT, ignore_errors=True)
    DIST_CP_SRC.unlink(missing_ok=True)
    DIST_ROOT.mkdir(parents=True)
    t0 = time.perf_counter()
    mp.spawn(_dist_rank, args=(TP, mf.free_port(), DIST_ROOT, dist_spec()), nprocs=TP, join=True)
    secs = time.perf_counter() - t0
    assert (DIST_ACTOR / "latest_checkpointed_iteration.txt").read_text() == "1"
    write_base(DIST_BASE)
    shards = [p for p in dist_files() if p.suffix == ".distcp"]
    concat(shards, DIST_CP_SRC)
    marker.write_text(sizes())
    total = sum(p.stat().st_size for p in shards)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"generated {DIST_ITER} ({total / 2**30:.2f} GiB in {len(shards)} .distcp files) by megatron-core in "
          f"{secs:.0f}s (+{time.perf_counter() - t0 - secs:.0f}s for the cp source); largest process "
          f"{peak:.0f} MiB", flush=True)


def generate_in_child(fmt="legacy"):
    """Generate in a subprocess so the timing parent never imports torch (its peak RSS would otherwise leak
    into the children's wait4 figures, see bench_pt.py)."""
    subprocess.run([sys.executable, __file__, "--format", fmt, "--generate-only"], check=True)


def headers(out):
    """{name: (dtype, shape)} over every safetensors file in out (header reads only)."""
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h = json.loads(fh.read(n))
        got.update({k: (v["dtype"], tuple(v["shape"])) for k, v in h.items() if k != "__metadata__"})
    return got


def digests(out):
    """{name: (dtype, shape, sha256 of its bytes)} over every safetensors file in out, read in 16 MiB chunks so
    the timing parent stays small."""
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h = json.loads(fh.read(n))
            h.pop("__metadata__", None)
            for k, v in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = v["data_offsets"]
                fh.seek(8 + n + begin)
                sha, left = hashlib.sha256(), end - begin
                while left:
                    chunk = fh.read(min(left, 16 << 20))
                    assert chunk, f"{f.name}: {k} runs past the end of the file"
                    sha.update(chunk)
                    left -= len(chunk)
                got[k] = (v["dtype"], tuple(v["shape"]), sha.hexdigest())
    return got


def main():
    args = bench_args(__doc__, "out_megatron", extra=[("--format", dict(
        choices=["legacy", "torch_dist"], default="legacy",
        help="the checkpoint format: legacy rank files (--ckpt-format torch) or torch_dist (megatron-core "
             "distributed checkpoint)"))])
    dist = args.format == "torch_dist"
    if args.generate_only:
        return generate_dist() if dist else generate()

    generate_in_child(args.format)
    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    out = Path(args.out)
    if dist:
        bench_pt.RSS_FILE = DATA / "rss_megatron_dist.txt"
        if out == DATA / "out_megatron":  # the default: its own, like the RSS file
            out = DATA / "out_megatron_dist"
        root, actor, it, base, cp_src, pipeline = DIST_ROOT, DIST_ACTOR, DIST_ITER, DIST_BASE, DIST_CP_SRC, TORCH_PIPELINE_DIST
        inputs = [p for p in dist_files() if p.suffix == ".distcp"]
        what = f"{len(inputs)} .distcp files (TP={TP})"
    else:
        root, actor, it, base, cp_src, pipeline = ROOT, ACTOR, ITER, BASE, CP_SRC, TORCH_PIPELINE
        inputs = list(ITER.rglob("model_optim_rng.pt"))
        what = f"{TP} rank files"
    tools = {
        "cp": lambda: ["cp", str(cp_src), str(out / "copy.bin")],
        "ckptconv": lambda: [args.ckptconv, "mg2hf", str(actor), str(out), str(base)],
    }
    if have_torch:
        tools["torch"] = lambda: [sys.executable, "-c", pipeline, str(REPO / "tests" / "fixtures"), str(it),
                                  str(base / "config.json"), str(out / "model.safetensors")]

    size = sum(f.stat().st_size for f in inputs)
    assert cp_src.stat().st_size == size, f"{cp_src} is not the concatenation of the input"
    plans = {}

    def check(name, rep, out):
        if name != "cp":
            produced = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            assert produced >= size * 0.9, f"{name} wrote only {produced} bytes"
            if rep == 0:
                plans[name] = digests(out) if dist else headers(out)

    runs = interleaved(tools, args.reps, out, check)
    if "torch" in plans:
        if dist:
            differ = sorted(k for k in plans["ckptconv"].keys() | plans["torch"].keys()
                            if plans["ckptconv"].get(k) != plans["torch"].get(k))
            assert not differ, f"ckptconv and torch wrote different tensors ({len(differ)}): {differ[:5]}"
            print(f"check: ckptconv and torch wrote the same {len(plans['torch'])} tensors (names, dtypes, shapes, "
                  f"bytes)")
        else:
            assert plans["ckptconv"] == plans["torch"], "ckptconv and torch wrote different names/dtypes/shapes"

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for n, rs in runs.items()}
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_note = ("peak RSS measured by GNU time" if GNU_TIME
                else f"RSS below {floor:.0f} MiB is the spawning parent's floor, not the tool's")
    print(f"\ninput {root.name}: {size / 2**30:.2f} GiB in {what}, medians of {args.reps} runs; {rss_note}")
    print(f"{'tool':<10}{'seconds':>10}{'x cp':>8}{'GB/s':>8}{'peak RSS MiB':>15}")
    for n, m in med.items():
        print(f"{n:<10}{m['seconds']:>10.2f}{m['seconds'] / med['cp']['seconds']:>8.2f}{size / m['seconds'] / 1e9:>8.2f}{m['peak_rss_mib']:>15.1f}")
    print(json.dumps({"input": str(root), "format": args.format, "input_bytes": size, "reps": args.reps, "rss_floor_mib": floor,
                      "median": med, "runs": runs}))


if __name__ == "__main__":
    main()
