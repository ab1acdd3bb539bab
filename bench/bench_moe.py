"""Benchmark `ckptconv mg2hf` on a Qwen3-30B-A3B-shaped Megatron MoE checkpoint (bf16, EP 4 x TP 2) against `cp` and torch.

Owns: bench/bench_moe.py (its input is cached in the gitignored bench/data/).
The input is Qwen3-30B-A3B at reduced depth: hidden 2048, 32 heads in 4 query groups of kv_channels 128,
qk_layernorm, no qkv bias, 128 experts of moe_ffn_hidden_size 768, top-8, vocab 151936 (padded to 152064 =
make_vocab_size_divisible_by 128 x TP 2), untied, but 4 layers; saved in megatron's legacy layout at TP 2 x EP 4
(expert TP = TP, PP 1): bench/data/megatron_moe_L4_E128_tp2_ep4_v151936/actor/iter_0000001/mp_rank_<TT>_<EEE>/
model_optim_rng.pt for TT in 00..01, EEE in 000..003 (8 files, ~1.3 GB each, ~10.4 GB), plus base_hf/ (config.json
as the Hub's Qwen3-30B-A3B has it, at this depth, and generation_config.json; no tokenizer: mg2hf does not need
one, as in bench_megatron.py). megatron-core cannot build this on CPU in reasonable time, so plain torch writes
it, in the layout real megatron-core 0.16.1 writes (the FACTS of tests/fixtures/make_megatron_moe_fixtures.py):
the key order is the real fixture qwen3moe_ep2_tp2's (rank file mp_rank_00_000, expanded to these layers and 32
local experts), every per-rank shape comes from one rule first checked against that fixture's real shapes, the
top-level entries are the fixture's (args, checkpoint_version, iteration, model, num_floating_point_operations_
so_far, as a --no-save-optim --no-save-rng run writes them), `_extra_state` entries are None, and args is the
fixture script's moe_args Namespace (mg.megatron_args plus num_experts, expert_model_parallel_size,
expert_tensor_parallel_size, moe_router_topk, moe_ffn_hidden_size, ...) with these dims, bf16, sequence_parallel
True (what training MoE with TP requires; it changes no saved tensor). Per rank: every EP rank holds the FULL
dense part of its TP rank (embedding / output rows, qkv rows, linear_proj columns; norms and the router [E, H]
replicated), identical across EP ranks; local expert j of EP rank e is global expert e * E/EP + j, its fc1 =
[gate rows of this TP rank; up rows of this TP rank] and its fc2 = this TP rank's columns. Values are seeded
random bf16 (std 0.02 dense, 1 +- 0.02 norms, 0.1 experts; each global expert from a seed of its own, sliced per
TP rank), generated per EP rank (the generator peaks at ~3.3 GB of RAM, 80 s); each tensor has its own storage.
The cache is reused while its marker (dims, every file's size) matches; --layers / --experts / --vocab / --tp /
--ep make other inputs, in folders of their own, and --quick is --layers 2 --experts 16 --vocab 16384 (~1 GB).

Tools, each run into an emptied scratch folder that is deleted after the run:
  cp -r      of the iteration folder (reads every rank file: the checkpoint's size)
  cp-needed  only the bytes mg2hf must read: both EP-rank-0 files whole (the dense part once, their experts) and
             the expert byte ranges of the other EP ranks' files (one range per layer per file, taken from the
             zip entries torch.save wrote), copied with copy_file_range, the call `cp` itself uses on this
             filesystem (checked with strace: coreutils 9.1 cp is one copy_file_range per file after FICLONE fails)
  ckptconv   target/release/ckptconv mg2hf <actor> <out> <base_hf> --quiet
  torch      a plain-torch merge in a subprocess: torch.load(mmap=True) of every rank file, then the fixture
             script's merge_legacy_moe (FORMATS.md §3/§3a: the dense part from EP rank 0 by mg.merge_to_hf,
             checked equal on the other EP ranks; TP parts concatenated; fc1 split per rank into gate / up;
             experts gathered over EP under HF per-expert names), safetensors save_file. Its output must equal
             ckptconv's tensor for tensor: names, dtypes, shapes and bytes (a SHA-256 per tensor), checked on
             the first run of each and fatal if not.
Two modes, interleaved within every repetition (so drift hits all tools and modes alike):
  hot   every input file is read once (untimed, `cat > /dev/null`) so it sits in the page cache, `sync`, then the
        tool runs (bench_pt.timed: no sync inside the timing)
  disk  `sync`; the page cache is dropped (echo 3 > /proc/sys/vm/drop_caches when allowed; otherwise every input
        file's pages are evicted with posix_fadvise(DONTNEED), verified with fincore), then the tool runs and the
        `sync` that flushes what it wrote, both inside the timing (bench_io.timed)
Peak RSS is GNU time's %M (mmap'd file pages a tool touched count in it); CPU seconds are user + system time of
the tool's process tree (getrusage of the reaped children around the run; kernel writeback threads are nobody's),
less sensitive than wall time to other jobs on this 2-core machine. The resident input bytes before every run (the
check that hot is hot and disk is cold), the 1-minute load and the I/O pressure are recorded. Medians (with the
spread max/min of each cell's runs and the median load), the ratios ckptconv / cp (of the medians and
paired per repetition), ckptconv / cp-needed and torch / ckptconv are printed against the targets (ckptconv <=
1.2x cp, <= 64 MiB peak RSS), then the JSON, which is also written to bench/data/<input>_result.json.

Run:  .venv/bin/python bench/bench_moe.py [--reps 3] [--modes hot,disk] [--quick] [--layers 4] [--experts 128]
                                          [--vocab 151936] [--tp 2] [--ep 4] [--no-torch]
                                          [--ckptconv target/release/ckptconv]
"""

import argparse
import contextlib
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
sys.path.insert(0, str(HERE))
# None of these import torch at module level, so the timing parent stays small.
import bench_io  # noqa: E402
import bench_pt  # noqa: E402
from bench_megatron import digests, layer_keys  # noqa: E402
from bench_pt import DATA, REPO, bench_args  # noqa: E402

bench_pt.RSS_FILE = bench_io.RSS_FILE = DATA / "rss_moe.txt"  # our own, so a concurrent bench cannot clobber it
LOG = DATA / "bench_moe.log"  # the tools' own stdout / stderr
FIXTURES = REPO / "tests" / "fixtures"
TEMPLATE = FIXTURES / "megatron_moe" / "qwen3moe_ep2_tp2"  # real megatron-core 0.16.1 output, TP 2 x EP 2
ITERATION = 1
SEED = 3000

# Qwen3-30B-A3B (config.json on the Hub) at 4 layers instead of 48; ffn is the dense ffn_hidden_size (HF
# intermediate_size, unused by its MoE layers). divisible = make_vocab_size_divisible_by.
DIMS = dict(hidden=2048, layers=4, heads=32, groups=4, kv_channels=128, ffn=6144, vocab=151936, divisible=128,
            experts=128, topk=8, moe_ffn=768, tp=2, ep=4)
QUICK = dict(layers=2, experts=16, vocab=16384)

TORCH_PIPELINE = """
import functools, json, sys, torch
sys.path.insert(0, sys.argv[1])
import make_megatron_moe_fixtures as moe
from safetensors.torch import save_file
torch.load = functools.partial(torch.load, mmap=True)  # load_moe_ranks' torch.load: every rank file memory-mapped
args, ranks = moe.load_moe_ranks(sys.argv[2])
cfg = json.load(open(sys.argv[3]))
save_file(moe.merge_legacy_moe(args, ranks, cfg), sys.argv[4], metadata={"format": "pt"})
"""

# cp of byte ranges: what cp does per file (copy_file_range until done), but from the offsets in the plan
CP_RANGES = """
import json, os, sys
root, out = sys.argv[2], sys.argv[3]
for i, (rel, ranges) in enumerate(json.load(open(sys.argv[1]))):
    with open(os.path.join(root, rel), "rb") as src, open(os.path.join(out, f"{i}.bin"), "wb") as dst:
        for off, n in ranges:
            while n:
                k = os.copy_file_range(src.fileno(), dst.fileno(), n, off)
                if k <= 0:
                    raise SystemExit(f"{rel}: copy_file_range returned {k} at {off}")
                off, n = off + k, n - k
"""


def padded_vocab(d):
    mult = d["divisible"] * d["tp"]
    return -(-d["vocab"] // mult) * mult


def root_of(d):
    return DATA / f"megatron_moe_L{d['layers']}_E{d['experts']}_tp{d['tp']}_ep{d['ep']}_v{d['vocab']}"


def rank_name(tp_rank, ep_rank):
    """mp_rank_<TP:02>_<EP:03> (PP 1, EP > 1), as get_checkpoint_name names it (FACTS of the fixture script)."""
    return f"mp_rank_{tp_rank:02d}_{ep_rank:03d}"


def rank_files(root, d):
    it = root / "actor" / f"iter_{ITERATION:07d}"
    return [it / rank_name(t, e) / "model_optim_rng.pt" for t in range(d["tp"]) for e in range(d["ep"])]


# --- the input ------------------------------------------------------------------------------------------------

def spec(d):
    """The fixture script's spec dict (what moe_args / hf_config read) for dims d: Qwen3-MoE, bf16, ETP = TP."""
    import make_megatron_moe_fixtures as moe

    s = dict(moe.FAMILIES["qwen3moe"], family="qwen3moe", pp=1, etp=d["tp"], grouped=False, dtype="bfloat16",
             tied=False, shared=None, shared_gate=False, pre_softmax=False, eps=1e-6, rope_theta=1000000.0)
    s.update({k: v for k, v in d.items()})
    s.update(world=d["tp"] * d["ep"], padded_vocab=padded_vocab(d), seed=SEED, lean=True, sequence_parallel=True)
    return s


def shape_of(key, d):
    """Per-rank shape of a megatron-core local-spec Qwen3-MoE tensor (SequentialMLP, ETP = TP, no biases)."""
    tp, hd = d["tp"], d["kv_channels"]
    rest = key.split("decoder.layers.", 1)[1].split(".", 1)[1] if key.startswith("decoder.layers.") else key
    if rest.startswith("mlp.experts.local_experts."):
        rest = "mlp.experts." + rest.split(".", 4)[4]
    return {
        "embedding.word_embeddings.weight": (padded_vocab(d) // tp, d["hidden"]),
        "output_layer.weight": (padded_vocab(d) // tp, d["hidden"]),
        "decoder.final_layernorm.weight": (d["hidden"],),
        "input_layernorm.weight": (d["hidden"],),
        "pre_mlp_layernorm.weight": (d["hidden"],),
        "self_attention.q_layernorm.weight": (hd,),
        "self_attention.k_layernorm.weight": (hd,),
        "self_attention.linear_qkv.weight": ((d["heads"] + 2 * d["groups"]) * hd // tp, d["hidden"]),
        "self_attention.linear_proj.weight": (d["hidden"], d["heads"] * hd // tp),
        "mlp.router.weight": (d["experts"], d["hidden"]),
        "mlp.experts.linear_fc1.weight": (2 * d["moe_ffn"] // tp, d["hidden"]),
        "mlp.experts.linear_fc2.weight": (d["hidden"], d["moe_ffn"] // tp),
    }[rest]


def template():
    """The real fixture's rank file mp_rank_00_000, and its dims (from its own args): every tensor's shape must
    follow shape_of, the rule the big input is written with."""
    import torch

    path = TEMPLATE / "actor" / f"iter_{ITERATION:07d}" / rank_name(0, 0) / "model_optim_rng.pt"
    ckpt = torch.load(path, weights_only=False)
    a = ckpt["args"]
    cfg = json.loads((TEMPLATE / "base_hf" / "config.json").read_text())
    d = dict(hidden=a.hidden_size, heads=a.num_attention_heads, groups=a.num_query_groups, kv_channels=a.kv_channels,
             vocab=cfg["vocab_size"], divisible=a.make_vocab_size_divisible_by, experts=a.num_experts,
             moe_ffn=a.moe_ffn_hidden_size, tp=a.tensor_model_parallel_size, ep=a.expert_model_parallel_size)
    assert a.expert_tensor_parallel_size == d["tp"] and a.pipeline_model_parallel_size == 1 and d["ep"] > 1
    assert padded_vocab(d) == a.padded_vocab_size and not a.moe_grouped_gemm
    for k, v in ckpt["model"].items():
        if torch.is_tensor(v):
            assert tuple(v.shape) == shape_of(k, d), f"shape rule wrong for {k}: {tuple(v.shape)}"
        else:
            assert v is None and k.endswith("._extra_state"), f"{k}: {v!r}"
    return ckpt, d["experts"] // d["ep"]


def expand_keys(model_keys, layers, n_local, tmpl_local):
    """The fixture's key order, its layer-0 block repeated for every layer and its local expert 0's keys for
    every local expert (checked: the fixture's other local experts have the same key suffixes, in order)."""
    block = [k[len("decoder.layers.0."):] for k in model_keys if k.startswith("decoder.layers.0.")]
    ex = "mlp.experts.local_experts."
    first = next(i for i, s in enumerate(block) if s.startswith(ex))
    per = [s[len(f"{ex}0."):] for s in block if s.startswith(f"{ex}0.")]
    assert block[first:first + tmpl_local * len(per)] == [f"{ex}{j}.{r}" for j in range(tmpl_local) for r in per]
    new_block = block[:first] + [f"{ex}{j}.{r}" for j in range(n_local) for r in per] + block[first + tmpl_local * len(per):]
    return layer_keys(model_keys, layers, new_block)


def random_bf16(shape, seed, std, mean=0.0):
    """Seeded N(mean, std) in bf16, drawn in row blocks of <= 32 M values so the fp32 temporaries stay small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1)
    rows = max(1, (32 << 20) // max(1, flat.shape[1]))
    for r in range(0, shape[0], rows):
        block = flat[r:r + rows]
        block.copy_(torch.randn(block.shape, generator=g).mul_(std).add_(mean))
    return out


def dense_part(keys, d, tp_rank):
    """{key: this TP rank's tensor} for every dense (non-expert) tensor: split tensors seeded per (key, TP rank),
    replicated ones (norms, router) per key, so they are identical on every rank."""
    import zlib

    out = {}
    for k in keys:
        if ".mlp.experts." in k or k.endswith("._extra_state"):
            continue
        replicated = k.endswith("norm.weight") or k.endswith("router.weight")
        seed = SEED * 1000003 + zlib.crc32(f"{k}|{'all' if replicated else tp_rank}".encode())
        norm = k.endswith("norm.weight")
        out[k] = random_bf16(shape_of(k, d), seed, 0.02, 1.0 if norm else 0.0)
    return out


def expert_part(d, ep_rank):
    """[{key: tensor}] per TP rank: EP rank ep_rank's local experts, each GLOBAL (layer, expert) drawn whole from a
    seed of its own (fc1 [2F, H] = [gate; up], fc2 [H, F], std 0.1) and sliced per expert-TP rank the way
    ColumnParallel / RowParallel split them (fc1: the rank's gate rows then its up rows; fc2: its columns)."""
    import torch

    tp, n_local, F, H = d["tp"], d["experts"] // d["ep"], d["moe_ffn"], d["hidden"]
    out = [{} for _ in range(tp)]
    for layer in range(d["layers"]):
        for j in range(n_local):
            g = ep_rank * n_local + j
            seed = SEED * 1000003 + 7919 * (layer * d["experts"] + g)
            fc1 = random_bf16((2 * F, H), seed, 0.1)
            fc2 = random_bf16((H, F), seed + 1, 0.1)
            gate, up = fc1.chunk(2, 0)
            pre = f"decoder.layers.{layer}.mlp.experts.local_experts.{j}."
            for r in range(tp):
                out[r][pre + "linear_fc1.weight"] = torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]], 0)
                out[r][pre + "linear_fc2.weight"] = fc2.chunk(tp, 1)[r].clone(memory_format=torch.contiguous_format)
    return out


def storage_ranges(path, tensor_keys):
    """{key: (data offset, byte length)} of every tensor of a torch.save zip file: storage data/N is the N-th
    storage pickled (its persistent id is its first-appearance index), here the N-th tensor of the model dict;
    each entry is stored uncompressed, its data after the 30-byte local header, the name and the extra field."""
    import struct
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for info in z.infolist():
            head, sep, n = info.filename.rpartition("/data/")
            if not sep or "/" in head:
                continue
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            out[tensor_keys[int(n)]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    assert len(out) == len(tensor_keys), f"{path}: {len(out)} storages for {len(tensor_keys)} tensors"
    return out


def write_base(folder, s):
    """config.json as the Hub's Qwen3-30B-A3B ships it (the fixture script's hf_config, with its real token ids
    and context), at this depth and vocab; and its generation_config.json."""
    import make_megatron_moe_fixtures as moe

    cfg = moe.hf_config(s)
    cfg.update(bos_token_id=151643, eos_token_id=151645, max_position_embeddings=40960, initializer_range=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}, indent=2) + "\n")


def valid_marker(root, d, files):
    """The generator's marker `root/ok` when it was written for dims `d` and `files` still have the sizes it records
    (shared with bench_zero.py and bench_fp8.py); else None."""
    marker = root / "ok"
    if not marker.exists():
        return None
    m = json.loads(marker.read_text())
    if m.get("dims") != d or not all(f.exists() for f in files):
        return None
    if m.get("sizes") != {str(f.relative_to(root)): f.stat().st_size for f in files}:
        return None
    return m


def generated(script, d, root, marker_ok):
    """Runs `script --generate-only` for dims `d` in a child (the timing parent never imports torch), then returns
    root's marker, which must be valid (shared with bench_zero.py and bench_fp8.py)."""
    DATA.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(script), "--generate-only", "--dims", json.dumps(d)], check=True)
    marker = marker_ok(root, d)
    assert marker, f"{root}: generation left no valid marker"
    return marker


def marker_ok(root, d):
    return valid_marker(root, d, rank_files(root, d))


def generate(d):
    """Write the rank files, the tracker file, base_hf/ and the cp-needed plan, once per dims."""
    sys.path.insert(0, str(FIXTURES))
    import torch
    import make_megatron_moe_fixtures as moe

    root = root_of(d)
    if marker_ok(root, d):
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    s = spec(d)
    tmpl, tmpl_local = template()
    keys = expand_keys(list(tmpl["model"]), d["layers"], d["experts"] // d["ep"], tmpl_local)
    tensor_keys = [k for k in keys if not k.endswith("._extra_state")]
    dense = [dense_part(keys, d, t) for t in range(d["tp"])]
    files, plan, needed = rank_files(root, d), [], 0
    for e in range(d["ep"]):
        experts = expert_part(d, e)
        for t in range(d["tp"]):
            model = {k: None if k.endswith("._extra_state") else experts[t][k] if ".mlp.experts." in k else dense[t][k]
                     for k in keys}
            for k, v in model.items():
                assert v is None or tuple(v.shape) == shape_of(k, d), k
            rank = t + d["tp"] * e  # megatron's default order tp-cp-ep-dp: TP fastest, then EP (= dense DP here)
            args = moe.moe_args(s, rank, s["world"])
            vars(args).update(max_position_embeddings=40960, seq_length=4096, rotary_base=1000000)
            path = files[e + d["ep"] * t]
            assert path.parent.name == rank_name(t, e)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(tmpl, model=model, args=args), path)
            del model
            # cp-needed: EP rank 0's files whole; the others' expert storages (one run per layer: only zip
            # headers of < 4 KB lie between consecutive entries)
            size = path.stat().st_size
            if e == 0:
                ranges = [[0, size]]
            else:
                spans = storage_ranges(path, tensor_keys)
                assert all(spans[k][1] == experts[t][k].numel() * 2 for k in experts[t])
                ranges = []
                for k in tensor_keys:
                    if ".mlp.experts." not in k:
                        continue
                    off, n = spans[k]
                    if ranges and 0 <= off - sum(ranges[-1]) < 4096:
                        ranges[-1][1] = off + n - ranges[-1][0]
                    else:
                        ranges.append([off, n])
            plan.append([str(path.relative_to(root)), ranges])
            needed += sum(n for _, n in ranges)
        del experts
    (root / "actor" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    write_base(root / "base_hf", s)
    (root / "cp_needed.json").write_text(json.dumps(plan) + "\n")
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(f.stat().st_size for f in files)
    (root / "ok").write_text(json.dumps({
        "dims": d, "sizes": {str(f.relative_to(root)): f.stat().st_size for f in files}, "needed_bytes": needed,
        "generation_seconds": round(secs, 1), "generator_peak_rss_mib": round(peak)}))
    print(f"generated {root.name}: {total / 1e9:.2f} GB in {len(files)} rank files ({needed / 1e9:.2f} GB needed "
          f"by mg2hf) in {secs:.0f}s, generator peak RSS {peak:.0f} MiB", flush=True)


# --- the runs -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def output_to(log):
    """The tools inherit fds 1 and 2 (bench_pt.timed spawns them): point those at `log` while they run."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def resident(files):
    """Bytes of `files` in the page cache (fincore), or None without fincore."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES"] + [str(f) for f in files],
                       capture_output=True, text=True, check=True)
    return sum(int(x) for x in r.stdout.split())


def evict(files):
    """Drop `files`' clean pages from the page cache (posix_fadvise DONTNEED needs no privilege)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    args = bench_args(__doc__, "out_moe", torch_help="skip the torch merge", extra=[
        ("--layers", dict(type=int, help=f"transformer layers (default {DIMS['layers']})")),
        ("--experts", dict(type=int, help=f"routed experts (default {DIMS['experts']})")),
        ("--vocab", dict(type=int, help=f"HF vocab_size (default {DIMS['vocab']})")),
        ("--tp", dict(type=int, help=f"tensor (and expert-tensor) parallel size (default {DIMS['tp']})")),
        ("--ep", dict(type=int, help=f"expert parallel size (default {DIMS['ep']})")),
        ("--quick", dict(action="store_true", help="a small input: " + " ".join(f"--{k} {v}" for k, v in QUICK.items()))),
        ("--modes", dict(default="hot,disk", help="hot, disk or both (default hot,disk)")),
        ("--dims", dict(help=argparse.SUPPRESS)),  # the generator child's dims, as JSON
    ])
    d = dict(DIMS, **(QUICK if args.quick else {}))
    d.update({k: getattr(args, k) for k in ("layers", "experts", "vocab", "tp", "ep") if getattr(args, k)})
    assert d["experts"] % d["ep"] == 0 and d["groups"] % d["tp"] == 0 and d["moe_ffn"] % d["tp"] == 0
    if args.generate_only:
        return generate(json.loads(args.dims))

    root = root_of(d)
    marker = generated(__file__, d, root, marker_ok)
    files = rank_files(root, d)
    actor, it, base = root / "actor", root / "actor" / f"iter_{ITERATION:07d}", root / "base_hf"
    size, needed = sum(f.stat().st_size for f in files), marker["needed_bytes"]
    out = Path(args.out)
    modes = args.modes.split(",")
    assert set(modes) <= {"hot", "disk"}, modes
    tools = {
        "cp -r": ["cp", "-r", str(it), str(out / "iter")],
        "cp-needed": [sys.executable, "-c", CP_RANGES, str(root / "cp_needed.json"), str(root), str(out)],
        "ckptconv": [args.ckptconv, "mg2hf", str(actor), str(out), str(base), "--quiet"],
    }
    if not args.no_torch:
        tools["torch"] = [sys.executable, "-c", TORCH_PIPELINE, str(FIXTURES), str(it), str(base / "config.json"),
                          str(out / "model.safetensors")]
    global_drop = "disk" in modes and bench_io.can_drop()
    drop_how = ("echo 3 > /proc/sys/vm/drop_caches" if global_drop
                else "posix_fadvise(DONTNEED) of the input files (drop_caches refused)")
    print(f"input {root.name}: {size / 1e9:.2f} GB in {len(files)} rank files (TP{d['tp']} x EP{d['ep']}), "
          f"mg2hf must read {needed / 1e9:.2f} GB; generated in {marker['generation_seconds']:.0f}s; "
          f"{args.reps} reps of modes {modes}; disk mode: {drop_how}; load {bench_io.loadavg():.1f}", flush=True)
    LOG.write_text("")

    runs = {(m, n): [] for m in modes for n in tools}
    plans, produced = {}, {}
    for rep in range(args.reps):
        for mode in modes:
            for name, argv in tools.items():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if mode == "hot":
                    subprocess.run(["cat"] + [str(f) for f in files], stdout=subprocess.DEVNULL, check=True)
                else:
                    subprocess.run(["sync"], check=True)
                    if global_drop:
                        bench_io.DROP.write_text("3\n")
                    else:
                        evict(files)
                res, load, psi = resident(files), bench_io.loadavg(), bench_io.io_pressure()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                try:
                    with output_to(LOG):
                        secs, rss = bench_pt.timed(argv) if mode == "hot" else bench_io.timed(argv, {}, False)
                except SystemExit:
                    print(f"{name} failed; the end of {LOG}:\n" + LOG.read_text()[-3000:], file=sys.stderr)
                    raise
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                if name in ("ckptconv", "torch"):
                    produced[name] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                    assert produced[name] >= needed * 0.9, f"{name} wrote only {produced[name]} bytes"
                    if name not in plans:
                        plans[name] = digests(out)
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs[(mode, name)].append({"seconds": secs, "cpu_seconds": cpu, "peak_rss_mib": rss,
                                           "resident_input_bytes": res,
                                           "load": load, "io_pressure_before": psi})
                print(f"rep {rep + 1}/{args.reps}  {mode:<5}{name:<10}{secs:7.2f} s  cpu {cpu:6.2f} s {rss:8.1f} MiB  "
                      f"input cached "
                      f"{'?' if res is None else f'{res / size:4.0%}'}  load {load:4.1f}", flush=True)
        if rep == 0 and "torch" in plans:
            a, b = plans["ckptconv"], plans["torch"]
            differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if differ:
                raise SystemExit(f"MISMATCH: ckptconv and torch wrote different tensors ({len(differ)} of "
                                 f"{len(a.keys() | b.keys())}), e.g. {[(k, a.get(k), b.get(k)) for k in differ[:3]]}")
            print(f"check: ckptconv and torch wrote the same {len(a)} tensors (names, dtypes, shapes, bytes)",
                  flush=True)

    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("seconds", "cpu_seconds", "peak_rss_mib")}
           | {"max_rss_mib": max(r["peak_rss_mib"] for r in rs),
              "spread": max(r["seconds"] for r in rs) / min(r["seconds"] for r in rs)} for k, rs in runs.items()}

    def ratio(mode, a, b):  # of the medians, and the median of each repetition's own ratio (drift cancels)
        if (mode, a) not in med or (mode, b) not in med:
            return None
        return {"of_medians": med[(mode, a)]["seconds"] / med[(mode, b)]["seconds"],
                "paired": statistics.median(x["seconds"] / y["seconds"] for x, y in zip(runs[(mode, a)], runs[(mode, b)]))}

    ratios = {mode: {"ckptconv/cp": ratio(mode, "ckptconv", "cp -r"),
                     "ckptconv/cp-needed": ratio(mode, "ckptconv", "cp-needed"),
                     "cp-needed/cp": ratio(mode, "cp-needed", "cp -r"),
                     "torch/ckptconv": ratio(mode, "torch", "ckptconv")} for mode in modes}
    ck_rss = max(m["max_rss_mib"] for (mode, n), m in med.items() if n == "ckptconv")
    targets = {"ckptconv/cp <= 1.2": {m: ratios[m]["ckptconv/cp"]["of_medians"] <= 1.2 for m in modes},
               "ckptconv peak RSS <= 64 MiB": ck_rss <= 64}

    print(f"\n{root.name}: {size / 1e9:.2f} GB read by cp -r, {needed / 1e9:.2f} GB needed by mg2hf, "
          f"{produced.get('ckptconv', 0) / 1e9:.2f} GB written; medians of {args.reps} reps (load median "
          f"{statistics.median(r['load'] for rs in runs.values() for r in rs):.1f}); hot = input cached, no sync "
          f"timed; disk = {drop_how}, sync timed")
    print(f"{'mode':<6}{'tool':<11}{'seconds':>9}{'x cp':>7}{'x cp-needed':>13}{'spread':>8}{'CPU s':>8}"
          f"{'peak RSS MiB':>14}")
    for (mode, n), m in med.items():
        print(f"{mode:<6}{n:<11}{m['seconds']:>9.2f}{m['seconds'] / med[(mode, 'cp -r')]['seconds']:>7.2f}"
              f"{m['seconds'] / med[(mode, 'cp-needed')]['seconds']:>13.2f}{m['spread']:>8.2f}{m['cpu_seconds']:>8.2f}"
              f"{m['max_rss_mib']:>14.1f}")
    for mode in modes:
        r = ratios[mode]
        line = (f"{mode}: ckptconv/cp {r['ckptconv/cp']['of_medians']:.2f} (paired {r['ckptconv/cp']['paired']:.2f}; "
                f"target <= 1.2: {'met' if targets['ckptconv/cp <= 1.2'][mode] else 'MISSED'}), ckptconv/cp-needed "
                f"{r['ckptconv/cp-needed']['of_medians']:.2f}")
        if r["torch/ckptconv"]:
            line += f", torch/ckptconv {r['torch/ckptconv']['of_medians']:.2f}"
        print(line)
    print(f"ckptconv peak RSS {ck_rss:.1f} MiB (max over runs; target <= 64 MiB: "
          f"{'met' if targets['ckptconv peak RSS <= 64 MiB'] else 'MISSED'})")
    result = {"input": str(root), "dims": d, "rank_files": len(files), "input_bytes": size, "needed_bytes": needed,
              "output_bytes": produced.get("ckptconv"), "generation_seconds": marker["generation_seconds"],
              "generator_peak_rss_mib": marker.get("generator_peak_rss_mib"), "reps": args.reps, "modes": modes,
              "page_cache_drop": drop_how, "ckptconv": args.ckptconv,
              "outputs_equal": ("names, dtypes, shapes, bytes" if "torch" in plans else None),
              "median": {f"{m}/{n}": v for (m, n), v in med.items()}, "ratios": ratios, "targets": targets,
              "runs": {f"{m}/{n}": v for (m, n), v in runs.items()}}
    (DATA / f"{root.name}_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
