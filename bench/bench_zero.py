"""Benchmark `ckptconv convert` on a DeepSpeed ZeRO-3 checkpoint of a Qwen2-1.5B-shaped model against `cp` and DeepSpeed's zero_to_fp32.

Owns: bench/bench_zero.py (its input is cached in the gitignored bench/data/). bench_fp8.py reuses its run loop.
The input is Qwen2-1.5B (hidden 1536, 28 layers, intermediate 8960, 12 heads / 2 kv heads, vocab 151936, tied word
embeddings: 1.54 B parameters, every one trainable, as in a full fine-tune) trained with ZeRO-3 in fp32 at data-
parallel world size 2: bench/data/zero3_qwen2_1.5b_w2/ckpt/{latest, zero_to_fp32.py, zero_to_torch.py,
global_step2/zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt} (R = 0, 1; ~9.3 GB per optim file, 18.5 GB in all:
the fp32 flat partition plus Adam's exp_avg and exp_avg_sq). Real DeepSpeed cannot train 1.5 B parameters on this
CPU machine, so plain torch.save writes the files in the structure real DeepSpeed 0.19.8 writes, taken from a real
checkpoint: tests/fixtures/make_zero_fixtures.py --only zero3_fp32_w2 (engine.save_checkpoint of a tiny Qwen2 at
world size 2, generated into bench/data/zero3_template/ when missing). Every top-level entry, its order and every
value that does not depend on the model (ZeroStageEnum, LossScaler, param_groups, step, ds_config, ds_version,
global_steps, ...) is the template's; what depends on the model follows rules first checked against the template:
  module                  the model's state_dict keys (a meta-device transformers Qwen2ForCausalLM of these dims) each
                          holding an empty fp32 placeholder (ZeRO-3 keeps none of a parameter's data there), the tied
                          lm_head.weight sharing model.embed_tokens.weight's storage, and the state dict's _metadata
  param_shapes            [OrderedDict(name -> torch.Size)] in named_parameters order (one group: 0.77 B elements per
                          rank stays under ZeRO-3's sub_group_size of 1e9), buffer_names [] (Qwen2's rotary buffers are
                          not persistent), frozen_param_shapes / frozen_param_fragments empty OrderedDicts (nothing
                          frozen), shared_params {"lm_head.weight": "model.embed_tokens.weight"} on rank 0 and {} on
                          the others (DeepSpeed collects them on rank 0 only)
  fp32_flat_groups        [one flat fp32 tensor per rank]: each parameter in param_shapes order contributes
                          ceil(numel / world) elements to every rank (zero_to_fp32's zero3_partitioned_param_info; the
                          last rank's tail padded with zeros); checked by rebuilding the template's parameters with this
                          rule and comparing them with the template's expected.safetensors (zero_to_fp32's own output)
  exp_avg / exp_avg_sq    the inner optimizer_state_dict's state[0] (one tensor each, the flat partition's size), with
                          their own storages, pickled before fp32_flat_groups as DeepSpeed's dict order has it
Values: each rank's slice of each parameter is seeded N(0, 0.02) (norms 1 +- 0.02) from (parameter, rank), drawn in
chunks; the moments are seeded too (|N(0, 1e-4)|; both map one scratch file, so they hold equal bytes). The generator
keeps one rank's flat partition in RAM (~3.1 GB) and writes ~18.5 GB. zero_to_fp32 itself then proves the files are
DeepSpeed's: it reads them and its consumed-numel check passes.

Tools, each run into an emptied scratch folder that is deleted after the run:
  cp -r        of the checkpoint folder (18.5 GB: what a copy of the checkpoint costs)
  cp-needed    only the bytes a converter must read: the model-states files whole and each optim file's fp32 flat
               partition (its storage's byte range in the torch.save zip), copied with copy_file_range as `cp` does
               (bench_moe.CP_RANGES); about the model's fp32 size, 6.2 GB
  ckptconv     target/release/ckptconv convert CKPT OUT --quiet              (fp32 safetensors)
  ckptconv bf16  ... --dtype bf16
  zero_to_fp32   python -m deepspeed.utils.zero_to_fp32 CKPT OUT: DeepSpeed's CLI as it is (lazy GatheredTensors,
                 torch.load(mmap=True), max_shard_size 5GB, torch.save .bin shards). `--safe_serialization` cannot
                 write a tied model (safetensors refuses lm_head.weight sharing the embedding's memory): tried once
                 before the runs, its error recorded (--no-probe skips it)
  zero_to_fp32 bf16  deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_state_dict(CKPT, OUT, dtype=bfloat16)
                 (the CLI has no dtype flag; the same function with its dtype argument)
Checks on the first repetition (fatal if they fail): ckptconv's and zero_to_fp32's outputs hold the same tensors,
names, dtypes, shapes and bytes (SHA-256 per tensor; the .bin side hashed in a torch child), fp32 and bf16; and a few
parameters rebuilt from the generator's seeds equal ckptconv's output (embedding, first and last layer, final norm).
Modes (interleaved within every repetition, as bench_moe.py):
  hot   the tool's input is read once (untimed) so it sits in the page cache: the cp-needed bytes for every tool but
        cp -r, every file for cp -r (18.5 GB does not fit in this machine's page cache: its "hot" is partly cold;
        the resident share is printed); `sync`; then the tool runs (bench_pt.timed: no sync inside the timing)
  disk  `sync`; page cache dropped (echo 3 > /proc/sys/vm/drop_caches when allowed, else posix_fadvise DONTNEED of
        the input files); the tool runs and the `sync` after it, both inside the timing (bench_io.timed)
Peak RSS is GNU time's %M (mmap'd file pages a tool touched count in it: zero_to_fp32's figure includes the
mmap'd flat partitions it read); CPU seconds are user + system of the tool's process tree. Medians, spread
(max/min), ratios of the medians and paired per repetition, the 1-minute load; JSON in
bench/data/zero3_qwen2_1.5b_w<W>_result.json.

Run:  .venv/bin/python bench/bench_zero.py [--reps 3] [--modes hot,disk] [--world 2] [--layers 28] [--no-torch]
                                           [--no-probe] [--ckptconv target/release/ckptconv]
(--no-torch skips both zero_to_fp32 tools; generation ~3-4 min once; a repetition of both modes ~5 min)
"""

import argparse
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
import bench_moe  # noqa: E402  (evict, resident, storage_ranges, CP_RANGES)
import bench_pt  # noqa: E402
from bench_megatron import digests  # noqa: E402
from bench_pt import DATA, REPO, bench_args  # noqa: E402

bench_pt.RSS_FILE = bench_io.RSS_FILE = DATA / "rss_zero.txt"  # our own (importing bench_moe set its own)
LOG = DATA / "bench_zero.log"
FIXTURES = REPO / "tests" / "fixtures"
TEMPLATE = DATA / "zero3_template"
CASE = "zero3_fp32_w2"
SEED = 4000

# Qwen2-1.5B (config.json on the Hub): tied word embeddings, q/k/v biases.
DIMS = dict(vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, inter=8960, world=2)

DS_BF16 = """
import sys, torch
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict
convert_zero_checkpoint_to_state_dict(sys.argv[1], sys.argv[2], dtype=torch.bfloat16)
"""

# {name: [safetensors dtype, shape, sha256]} of every tensor in a torch.save output folder (zero_to_fp32's .bin
# shards), written as JSON to argv[2]; shared tensors are hashed under each name.
BIN_DIGESTS = """
import glob, hashlib, json, os, sys, torch
ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
      torch.uint8: "U8", torch.bool: "BOOL"}
out = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.bin"))):
    sd = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
    for k, v in sd.items():
        b = v.contiguous().view(-1).view(torch.uint8).numpy()
        out[k] = [ST[v.dtype], list(v.shape), hashlib.sha256(b).hexdigest()]
json.dump(out, open(sys.argv[2], "w"))
"""


def root_of(d):
    depth = "1.5b" if d["layers"] == DIMS["layers"] else f"L{d['layers']}"
    return DATA / f"zero3_qwen2_{depth}_w{d['world']}"


def ckpt_files(root, d):
    step = root / "ckpt" / "global_step2"
    return ([step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(d["world"])]
            + [step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(d["world"])])


# --- the input ------------------------------------------------------------------------------------------------

def qwen2_config(d):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                       num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                       intermediate_size=d["inter"], tie_word_embeddings=True, max_position_embeddings=131072,
                       rms_norm_eps=1e-6)


def meta_model(cfg):
    """(state_dict keys, their _metadata, [(name, torch.Size)] of named_parameters) of a meta-device
    Qwen2ForCausalLM: the names, order and shapes DeepSpeed's engine sees."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model.tie_weights()
    sd = model.state_dict()
    return list(sd), sd._metadata, [(n, p.shape) for n, p in model.named_parameters()]


def partitioned(numel, world):
    """zero_to_fp32's zero3_partitioned_param_info: ceil(numel / world) elements per rank."""
    return -(-numel // world)


def template():
    """The real fixture's rank files (generated once into TEMPLATE) after checking the rules this script writes
    with against them: module keys, _metadata, param_shapes, and the flat-partition layout."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config

    case = TEMPLATE / CASE
    if not (case / "meta.json").exists():
        shutil.rmtree(TEMPLATE, ignore_errors=True)
        subprocess.run([sys.executable, str(FIXTURES / "make_zero_fixtures.py"), "--out", str(TEMPLATE), "--only",
                        CASE], check=True, stdout=subprocess.DEVNULL)
    step = case / "ckpt" / "global_step2"
    world = json.loads((case / "meta.json").read_text())["world_size"]
    models = [torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)
              for r in range(world)]
    optims = [torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
              for r in range(world)]
    m0 = models[0]
    keys, metadata, params = meta_model(Qwen2Config.from_json_file(case / "hf" / "config.json"))
    assert [k for k in m0["module"] if k not in m0["buffer_names"]] == keys, "module key rule"
    assert m0["module"]._metadata == metadata, "module _metadata rule"
    assert all(v.numel() == 0 and v.dtype == torch.float32 for k, v in m0["module"].items() if k not in m0["buffer_names"])
    mod = m0["module"]
    assert mod["lm_head.weight"].untyped_storage()._cdata == mod["model.embed_tokens.weight"].untyped_storage()._cdata
    frozen = set(m0["frozen_param_shapes"])
    assert len(m0["param_shapes"]) == 1 and list(m0["param_shapes"][0].items()) == [
        (n, s) for n, s in params if n not in frozen], "param_shapes rule"
    assert m0["shared_params"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert all(m["shared_params"] == {} for m in models[1:]), "shared_params on rank 0 only"
    # flat layout: each parameter's rank slices, in param_shapes order, rebuild zero_to_fp32's output
    expected = load_file(case / "expected.safetensors")
    flats = [o["optimizer_state_dict"]["fp32_flat_groups"] for o in optims]
    assert all(len(f) == 1 for f in flats)
    off = 0
    for name, shape in m0["param_shapes"][0].items():
        pn = partitioned(shape.numel(), world)
        full = torch.cat([f[0][off:off + pn] for f in flats])[:shape.numel()].view(shape)
        assert torch.equal(full, expected[name]), f"flat layout rule: {name}"
        off += pn
    assert off == flats[0][0].numel(), "flat partition has more than the parameters"
    osd = optims[0]["optimizer_state_dict"]
    assert list(osd) == ["zero_stage", "loss_scaler", "dynamic_loss_scale", "overflow", "partition_count",
                         "optimizer_state_dict", "fp32_flat_groups"], list(osd)
    assert list(osd["optimizer_state_dict"]["state"]) == [0]
    assert list(osd["optimizer_state_dict"]["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    return case, models, optims


def rank_slice(name, shape, rank, world):
    """This rank's ceil(numel/world) elements of parameter `name`, seeded from (name, rank); zeros past numel."""
    import torch
    import zlib

    numel, pn = shape.numel(), partitioned(shape.numel(), world)
    g = torch.Generator().manual_seed(SEED * 1000003 + zlib.crc32(f"{name}|{rank}".encode()))
    out = torch.empty(pn)
    step = 32 << 20
    for i in range(0, pn, step):
        out[i:i + step] = torch.randn(min(step, pn - i), generator=g)
    out.mul_(0.02)
    if name.endswith("norm.weight"):
        out.add_(1.0)
    valid = max(0, min(pn, numel - rank * pn))
    out[valid:] = 0
    return out


def full_param(name, shape, world):
    """The parameter the rank slices make up (what zero_to_fp32 rebuilds)."""
    import torch

    return torch.cat([rank_slice(name, shape, r, world) for r in range(world)])[:shape.numel()].view(shape)


def generate(d):
    """Write the checkpoint, its cp-needed plan and a marker, once per dims."""
    import torch

    root = root_of(d)
    if marker_ok(root, d):
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    case, tm, to = template()
    world = d["world"]
    keys, metadata, params = meta_model(qwen2_config(d))
    shapes = dict(params)
    assert "lm_head.weight" in keys and "lm_head.weight" not in shapes  # tied: one parameter, two state-dict names
    total = sum(partitioned(s.numel(), world) for s in shapes.values())
    assert total < 1e9, "ZeRO-3 would split the group into sub groups (sub_group_size 1e9)"
    ckpt = root / "ckpt"
    step = ckpt / "global_step2"
    step.mkdir(parents=True)
    (ckpt / "latest").write_text((case / "ckpt" / "latest").read_text())
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed copies its recovery scripts beside `latest`
        shutil.copy2(case / "ckpt" / script, ckpt / script)
    files = ckpt_files(root, d)
    plan, needed = [], 0
    for r in range(world):
        # model states: the template's dict with this model's entries
        embed = torch.empty(0)
        module = type(tm[0]["module"])((k, embed if k in ("model.embed_tokens.weight", "lm_head.weight")
                                        else torch.empty(0)) for k in keys)
        module._metadata = metadata
        model_states = dict(tm[0], module=module, buffer_names=[],
                            param_shapes=[type(tm[0]["param_shapes"][0])(params)],
                            frozen_param_shapes=type(tm[0]["frozen_param_shapes"])(),
                            shared_params={"lm_head.weight": "model.embed_tokens.weight"} if r == 0 else {},
                            frozen_param_fragments=type(tm[0]["frozen_param_fragments"])(),
                            dp_world_size=world)
        assert list(model_states) == list(tm[0])
        torch.save(model_states, files[r])
        del model_states, module
        # optimizer states: the flat fp32 partition in RAM, the two moments mapped from one scratch file
        flat = torch.empty(total)
        off = 0
        for name, shape in params:
            pn = partitioned(shape.numel(), world)
            flat[off:off + pn] = rank_slice(name, shape, r, world)
            off += pn
        scratch = root / f"moments_{r}.scratch"
        m1 = torch.from_file(str(scratch), shared=True, size=total, dtype=torch.float32)
        g = torch.Generator().manual_seed(SEED + 17 + r)
        for i in range(0, total, 32 << 20):
            n = min(32 << 20, total - i)
            m1[i:i + n] = torch.randn(n, generator=g).abs_().mul_(1e-4)
        m2 = torch.from_file(str(scratch), shared=True, size=total, dtype=torch.float32)  # a storage of its own
        tosd = to[0]["optimizer_state_dict"]
        inner = dict(tosd["optimizer_state_dict"], state={0: dict(tosd["optimizer_state_dict"]["state"][0],
                                                                 exp_avg=m1, exp_avg_sq=m2)})
        osd = dict(tosd, partition_count=world, optimizer_state_dict=inner, fp32_flat_groups=[flat])
        path = files[world + r]
        torch.save(dict(to[0], optimizer_state_dict=osd), path)
        # cp-needed: the model-states file whole, the flat partition's byte range (storage data/3: step, exp_avg,
        # exp_avg_sq, then the flat group, in pickling order), checked against the bytes it must hold
        spans = bench_moe.storage_ranges(path, ["step", "exp_avg", "exp_avg_sq", "flat"])
        off, n = spans["flat"]
        assert n == total * 4
        with open(path, "rb") as fh:
            fh.seek(off)
            assert fh.read(4096) == flat[:1024].numpy().tobytes(), "flat partition is not where the zip says"
            fh.seek(off + n - 4096)
            assert fh.read(4096) == flat[-1024:].numpy().tobytes()
        plan.append([str(files[r].relative_to(root)), [[0, files[r].stat().st_size]]])
        plan.append([str(path.relative_to(root)), [[off, n]]])
        needed += files[r].stat().st_size + n
        del flat, m1, m2, inner, osd
        scratch.unlink()
    (root / "cp_needed.json").write_text(json.dumps(plan) + "\n")
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(f.stat().st_size for f in files)
    params_n = sum(s.numel() for s in shapes.values())
    (root / "ok").write_text(json.dumps({
        "dims": d, "sizes": {str(f.relative_to(root)): f.stat().st_size for f in files}, "needed_bytes": needed,
        "parameters": params_n, "generation_seconds": round(secs, 1), "generator_peak_rss_mib": round(peak)}))
    print(f"generated {root.name}: {params_n / 1e9:.3f} B parameters, {size / 1e9:.2f} GB in {len(files)} files "
          f"({needed / 1e9:.2f} GB needed) in {secs:.0f}s, generator peak RSS {peak:.0f} MiB", flush=True)


def marker_ok(root, d):
    return bench_moe.valid_marker(root, d, ckpt_files(root, d))


def verify_values(out, d, dtype):
    """A few parameters rebuilt from the generator's seeds equal ckptconv's output (cast to dtype)."""
    import torch
    from safetensors import safe_open

    _, _, params = meta_model(qwen2_config(d))
    shapes = dict(params)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
             f"model.layers.{d['layers'] - 1}.mlp.down_proj.weight", "model.norm.weight"]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
        for n in names:
            want = full_param(n, shapes[n], d["world"]).to(dt)
            assert torch.equal(f.get_tensor(n), want), f"{n} differs from the generator's values"
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    print(f"values: {len(names)} parameters equal the generator's ({dtype})", flush=True)


# --- the runs (shared with bench_fp8.py) -----------------------------------------------------------------------

output_to = bench_moe.output_to


def warm(reads):
    """Read [(path, [[offset, length], ...] or None for the whole file)] once, so they sit in the page cache."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path, ranges in reads:
        with open(path, "rb", buffering=0) as fh:
            for off, n in ranges or [[0, os.fstat(fh.fileno()).st_size]]:
                fh.seek(off)
                while n > 0:
                    k = fh.readinto(view[:min(n, len(buf))])
                    if not k:
                        break
                    n -= k


def same_output_as(reference, modes):
    """A check for measure(): on the first repetition of the first mode, the files each tool writes under OUT/hf
    (SHA-256 per file) must be `reference`'s (`cp` is not checked); a difference stops the benchmark."""
    from bench_wasi import tree_digest

    digests = {}

    def check(name, rep, mode, folder):
        if name == "cp" or rep > 0 or mode != modes[0]:
            return
        digests[name] = tree_digest(folder / "hf")
        assert digests[name], f"{name} wrote nothing"
        if name != reference and digests[name] != digests[reference]:
            raise SystemExit(f"{name}: output differs from {reference}'s")
        print(f"rep 1: {name} output {'(reference)' if name == reference else f'byte-identical to {reference}'}")

    return check


def tree_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def measure(tools, modes, reps, out, hot_reads, inputs, check, log, resident_of=None):
    """Every tool once per repetition and mode, in turn. tools {name: argv}; hot_reads {name: reads for warm()};
    inputs: every input file (evicted in disk mode; its residency recorded unless resident_of {name: files} names the
    files to report for a tool); check(name, rep, mode, out) runs after each run, before its output is deleted.
    Returns (runs {(mode, name): [row]}, how the page cache was dropped)."""
    drop = "disk" in modes and bench_io.can_drop()
    drop_how = ("echo 3 > /proc/sys/vm/drop_caches" if drop
                else "posix_fadvise(DONTNEED) of the input files (drop_caches refused)" if "disk" in modes
                else "no disk mode")
    runs = {(m, n): [] for m in modes for n in tools}
    for rep in range(reps):
        for mode in modes:
            for name, argv in tools.items():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if mode == "hot":
                    warm(hot_reads[name])
                else:
                    subprocess.run(["sync"], check=True)
                    if drop:
                        bench_io.DROP.write_text("3\n")
                    else:
                        bench_moe.evict(inputs)
                watched = resident_of[name] if resident_of else inputs
                size = sum(f.stat().st_size for f in watched)
                res, load, psi = bench_moe.resident(watched), bench_io.loadavg(), bench_io.io_pressure()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                try:
                    with output_to(log):
                        secs, rss = bench_pt.timed(argv) if mode == "hot" else bench_io.timed(argv, {}, False)
                except SystemExit:
                    print(f"{name} failed; the end of {log}:\n" + log.read_text()[-3000:], file=sys.stderr)
                    raise
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                written = tree_bytes(out)
                check(name, rep, mode, out)
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs[(mode, name)].append({"seconds": secs, "cpu_seconds": cpu, "peak_rss_mib": rss,
                                           "written_bytes": written, "resident_input_bytes": res, "load": load,
                                           "io_pressure_before": psi})
                print(f"rep {rep + 1}/{reps}  {mode:<5}{name:<18}{secs:7.2f} s  cpu {cpu:6.2f} s {rss:8.1f} MiB  "
                      f"wrote {written / 1e9:5.2f} GB  input cached "
                      f"{'?' if res is None else f'{res / size:4.0%}'}  load {load:4.1f}", flush=True)
    return runs, drop_how


def summarize(runs, modes, ratios):
    """Medians per (mode, tool) and the ratios [(a, b)] = a / b (of the medians, and paired per repetition)."""
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("seconds", "cpu_seconds", "peak_rss_mib", "load")}
           | {"max_rss_mib": max(r["peak_rss_mib"] for r in rs),
              "spread": max(r["seconds"] for r in rs) / min(r["seconds"] for r in rs),
              "written_bytes": rs[0]["written_bytes"]} for k, rs in runs.items()}
    out = {}
    for mode in modes:
        for a, b in ratios:
            if (mode, a) in med and (mode, b) in med:
                out[f"{mode}: {a} / {b}"] = {
                    "of_medians": med[(mode, a)]["seconds"] / med[(mode, b)]["seconds"],
                    "paired": statistics.median(x["seconds"] / y["seconds"]
                                                for x, y in zip(runs[(mode, a)], runs[(mode, b)]))}
    return med, out


def print_table(med, ratios, bases):
    cols = "".join(f"{'x ' + b:>{max(9, len(b) + 4)}}" for b in bases)
    print(f"{'mode':<6}{'tool':<19}{'seconds':>9}{cols}{'spread':>8}{'CPU s':>8}{'peak RSS MiB':>14}{'GB out':>8}"
          f"{'load':>6}")
    for (mode, n), m in med.items():
        xs = "".join(f"{m['seconds'] / med[(mode, b)]['seconds']:>{max(9, len(b) + 4)}.2f}" if (mode, b) in med
                     else f"{'-':>{max(9, len(b) + 4)}}" for b in bases)
        print(f"{mode:<6}{n:<19}{m['seconds']:>9.2f}{xs}{m['spread']:>8.2f}{m['cpu_seconds']:>8.2f}"
              f"{m['max_rss_mib']:>14.1f}{m['written_bytes'] / 1e9:>8.2f}{m['load']:>6.1f}")
    for k, r in ratios.items():
        print(f"{k}: {r['of_medians']:.2f} (paired {r['paired']:.2f})")


def compare(a, b, what):
    """Fatal unless the two {name: (dtype, shape, sha)} maps agree; returns a one-line summary."""
    a = {k: (v[0], tuple(v[1]), v[2]) for k, v in a.items()}
    b = {k: (v[0], tuple(v[1]), v[2]) for k, v in b.items()}
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        raise SystemExit(f"MISMATCH {what}: {len(differ)} of {len(a.keys() | b.keys())} tensors differ, e.g. "
                         f"{[(k, a.get(k), b.get(k)) for k in differ[:3]]}")
    return f"{what}: the same {len(a)} tensors (names, dtypes, shapes, bytes)"


# --- main -----------------------------------------------------------------------------------------------------

def main():
    args = bench_args(__doc__, "out_zero", torch_help="skip DeepSpeed's zero_to_fp32 (both tools)", extra=[
        ("--world", dict(type=int, help=f"data-parallel world size (default {DIMS['world']})")),
        ("--layers", dict(type=int, help=f"transformer layers (default {DIMS['layers']})")),
        ("--modes", dict(default="hot,disk", help="hot, disk or both (default hot,disk)")),
        ("--no-probe", dict(action="store_true", help="do not try zero_to_fp32 --safe_serialization once")),
        ("--dims", dict(help=argparse.SUPPRESS)),
        ("--verify-values", dict(nargs=2, metavar=("OUT", "DTYPE"), help=argparse.SUPPRESS)),
    ])
    d = dict(DIMS)
    d.update({k: getattr(args, k) for k in ("world", "layers") if getattr(args, k)})
    if args.generate_only:
        return generate(json.loads(args.dims))
    if args.verify_values:
        return verify_values(args.verify_values[0], json.loads(args.dims), args.verify_values[1])

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's import picks the CPU accelerator without probing
    root = root_of(d)
    marker = bench_moe.generated(__file__, d, root, marker_ok)
    files = ckpt_files(root, d)
    ckpt = root / "ckpt"
    size, needed = sum(f.stat().st_size for f in files), marker["needed_bytes"]
    out = Path(args.out)
    modes = args.modes.split(",")
    assert set(modes) <= {"hot", "disk"}, modes
    py, c = sys.executable, args.ckptconv
    tools = {
        "cp -r": ["cp", "-r", str(ckpt), str(out / "ckpt")],
        "cp-needed": [py, "-c", bench_moe.CP_RANGES, str(root / "cp_needed.json"), str(root), str(out)],
        "ckptconv": [c, "convert", str(ckpt), str(out), "--quiet"],
        "ckptconv bf16": [c, "convert", str(ckpt), str(out), "--dtype", "bf16", "--quiet"],
    }
    if not args.no_torch:
        tools["zero_to_fp32"] = [py, "-m", "deepspeed.utils.zero_to_fp32", str(ckpt), str(out)]
        tools["zero_to_fp32 bf16"] = [py, "-c", DS_BF16, str(ckpt), str(out)]
    plan = json.loads((root / "cp_needed.json").read_text())
    needed_reads = [(root / rel, ranges) for rel, ranges in plan]
    hot_reads = {n: ([(f, None) for f in files] if n == "cp -r" else needed_reads) for n in tools}
    print(f"input {root.name}: {marker['parameters'] / 1e9:.3f} B parameters, {size / 1e9:.2f} GB in {len(files)} "
          f"files (world {d['world']}), {needed / 1e9:.2f} GB needed; generated in {marker['generation_seconds']:.0f}s; "
          f"{args.reps} reps of modes {modes}; load {bench_io.loadavg():.1f}", flush=True)
    LOG.write_text("")

    probe = None
    if not args.no_torch and not args.no_probe:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        r = subprocess.run([py, "-m", "deepspeed.utils.zero_to_fp32", str(ckpt), str(out), "--safe_serialization"],
                           capture_output=True, text=True)
        tail = [line.strip() for line in r.stderr.splitlines() if line.strip()][-6:]
        probe = {"argv": "zero_to_fp32 CKPT OUT --safe_serialization", "exit_code": r.returncode,
                 "seconds": round(time.perf_counter() - t0, 1), "stderr_tail": tail}
        print(f"probe: zero_to_fp32 --safe_serialization exited {r.returncode} after {probe['seconds']} s: "
              f"{' / '.join(tail[-4:])[:400]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    plans, checks = {}, []

    def check(name, rep, mode, out):
        if rep or mode != modes[0] or name.startswith("cp"):
            return
        if name.startswith("ckptconv"):
            plans[name] = digests(out)
            dtype = "bf16" if name.endswith("bf16") else "fp32"
            subprocess.run([py, __file__, "--verify-values", str(out), dtype, "--dims", json.dumps(d)], check=True)
            checks.append(f"{name}: embedding, layer 0 q bias, last down_proj, final norm equal the generator's")
        else:
            dig = DATA / "zero_bin_digests.json"
            subprocess.run([py, "-c", BIN_DIGESTS, str(out), str(dig)], check=True)
            plans[name] = json.loads(dig.read_text())
            dig.unlink()
        for a, b in (("ckptconv", "zero_to_fp32"), ("ckptconv bf16", "zero_to_fp32 bf16")):
            if a in plans and b in plans:
                checks.append(compare(plans.pop(a), plans.pop(b), f"{a} vs {b}"))
                print("check: " + checks[-1], flush=True)

    runs, drop_how = measure(tools, modes, args.reps, out, hot_reads, files, check, LOG)
    shutil.rmtree(out, ignore_errors=True)
    pairs = [("ckptconv", "cp-needed"), ("ckptconv", "cp -r"), ("ckptconv bf16", "cp-needed"),
             ("ckptconv bf16", "cp -r"), ("zero_to_fp32", "ckptconv"), ("zero_to_fp32 bf16", "ckptconv bf16")]
    med, ratios = summarize(runs, modes, pairs)
    print(f"\n{root.name}: {size / 1e9:.2f} GB checkpoint, {needed / 1e9:.2f} GB needed; medians of {args.reps} reps; "
          f"hot = input cached (cp -r: as much as fits), no sync timed; disk = {drop_how}, sync timed")
    print_table(med, ratios, ["cp-needed", "cp -r"])
    result = {"input": str(root), "dims": d, "parameters": marker["parameters"], "input_bytes": size,
              "needed_bytes": needed, "generation_seconds": marker["generation_seconds"],
              "generator_peak_rss_mib": marker["generator_peak_rss_mib"], "reps": args.reps, "modes": modes,
              "page_cache_drop": drop_how, "ckptconv": c, "checks": checks, "safe_serialization_probe": probe,
              "median": {f"{m}/{n}": v for (m, n), v in med.items()}, "ratios": ratios,
              "runs": {f"{m}/{n}": v for (m, n), v in runs.items()}}
    (DATA / f"{root.name}_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
