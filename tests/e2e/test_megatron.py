"""End-to-end tests of `ckptconv mg2hf` (and `convert --base`, `inspect`) on Megatron checkpoints: legacy rank
files, and the same models saved as torch_dist.

Owns: tests/e2e/test_megatron.py. Inputs: tests/fixtures/make_megatron_fixtures.py -> tests/fixtures/megatron/,
REAL megatron-core GPT models (TP 1/2/4, TP2xPP2, bf16, tied, padded vocab, Qwen3 qk-norm, Llama, Phi-3's fused
names, TE norm names) saved per rank the way Megatron saves them. Expectations never come from hard-coded values:
  - logits: transformers' float32 forward of ckptconv's output must reproduce megatron's own forward
    (reference_logits.pt) within 1e-4 (fp32) / 5e-2 (bf16 compute; the bf16 case also has an fp32-compute
    reference of the same weights, held to 1e-4);
  - tensors: bit-identical to merge_to_hf, a plain-torch merge written from FORMATS.md §3 that lives in the
    fixture script and is itself checked against megatron's logits (test_python_reference);
  - names/shapes: the HF model that transformers builds from the base config.json.
Run: .venv/bin/python -m pytest tests/e2e/test_megatron.py   (binary: env CKPTCONV, see conftest.py)
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import manifest
from conftest import FIXTURES, INDEX, assert_same, load_output, read_header, shard_files

sys.path.insert(0, str(FIXTURES))
from make_megatron_fixtures import (  # noqa: E402
    DTYPES, dist_merge, hf_logits, load_dist, load_ranks, merge_to_hf, self_check, self_check_dist, self_check_optim)

MG = FIXTURES / "megatron"
MANIFEST = json.loads((MG / "manifest.json").read_text())
GOOD = sorted(MANIFEST)
ITER = "iter_0000001"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def base_config(case_dir):
    return json.loads((case_dir / "base_hf" / "config.json").read_text())


@pytest.fixture(scope="session")
def converted(binary, tmp_path_factory):
    """case -> output folder of `ckptconv mg2hf <case>/actor <out> <case>/base_hf` (once per session)."""
    import subprocess

    cache = {}

    def _converted(case):
        if case not in cache:
            out = tmp_path_factory.mktemp(case) / "hf"
            r = subprocess.run([binary, "mg2hf", MG / case / "actor", out, MG / case / "base_hf"],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"mg2hf {case} failed ({r.returncode}):\n{r.stderr[-4000:]}"
            manifest.record(["mg2hf", case], out=out, key=f"mg2hf {case}")
            cache[case] = out
        return cache[case]
    return _converted


@pytest.fixture(scope="session")
def reference():
    """case -> merge_to_hf of its rank files (the plain-torch merge), cached."""
    cache = {}

    def _reference(case, dtype=None):
        key = (case, dtype)
        if key not in cache:
            ranks = load_ranks(MG / case / "actor" / ITER)
            cache[key] = merge_to_hf(ranks, base_config(MG / case), dtype)
        return cache[key]
    return _reference


def hf_skeleton(case_dir):
    """{name: shape} of the HF model transformers builds from the base config (tied lm_head left out)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(case_dir / "base_hf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if base_config(case_dir)["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")
    return shapes


# --- the fixtures themselves -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOOD)
def test_python_reference(case):
    """The plain-torch merge reproduces megatron's logits: if this fails, the fixtures are wrong, not ckptconv."""
    self_check(MG / case)


# --- good cases --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOOD)
def test_logits_match_megatron(converted, case):
    out, case_dir = converted(case), MG / case
    got = hf_logits(out, torch.load(case_dir / "input_ids.pt"))
    want = torch.load(case_dir / "reference_logits.pt")
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    tol = TOL[MANIFEST[case]["dtype"]]
    assert diff <= tol, f"{case}: max |HF(ckptconv) - megatron| = {diff} > {tol}"
    if (case_dir / "reference_logits_fp32.pt").exists():  # same bf16 weights, megatron computing in fp32
        diff = (got - torch.load(case_dir / "reference_logits_fp32.pt")).abs().max().item()
        assert diff <= 1e-4, f"{case}: vs megatron's fp32-compute forward: {diff}"


@pytest.mark.parametrize("case", GOOD)
def test_tensors_match_reference_merge(converted, reference, case):
    """Names, dtypes, shapes and bytes equal the plain-torch merge; names and shapes equal the HF model's."""
    got = load_output(converted(case))
    assert_same(got, reference(case), case)
    assert {k: tuple(v.shape) for k, v in got.items()} == hf_skeleton(MG / case)
    want_dtype = DTYPES[base_config(MG / case)["torch_dtype"]]
    assert {v.dtype for v in got.values()} == {want_dtype}


def test_tied_has_no_lm_head(converted):
    out = converted("qwen2_tp2_tied")
    names = set().union(*(read_header(f)[0].keys() for f in shard_files(out)))
    assert "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names


def test_padded_vocab_is_trimmed(converted):
    got = load_output(converted("qwen2_tp2_padded"))
    m = MANIFEST["qwen2_tp2_padded"]
    assert m["padded_vocab"] > m["vocab"], "fixture is not padded"
    assert got["model.embed_tokens.weight"].shape[0] == base_config(MG / "qwen2_tp2_padded")["vocab_size"]
    assert got["lm_head.weight"].shape[0] == m["vocab"]


@pytest.mark.parametrize("case", GOOD)
def test_side_files_copied(converted, case):
    out, base = converted(case), MG / case / "base_hf"
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), f"{name} not copied verbatim"


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_base_weights_never_copied(converted):
    """qwen2_tp2's base holds decoy sharded weights and an index (right names, wrong values)."""
    case = "qwen2_tp2"
    base = MG / case / "base_hf"
    decoys = [p for p in base.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    assert len(decoys) == 3, "the fixture lost its decoy weights"
    out = converted(case)
    decoy_digests = {digest(p) for p in decoys}
    for p in out.iterdir():
        assert digest(p) not in decoy_digests, f"{p.name} is a copy of a base weight file"
    announced = {p.name for p in shard_files(out)} | ({INDEX} if (out / INDEX).exists() else set())
    stray = {p.name for p in out.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)} - announced
    assert not stray, f"weight files the output does not announce: {sorted(stray)}"


def test_phi3_fuses_qkv_and_gate_up(converted, reference):
    """A Phi-3 base gets Phi-3's fused projections: qkv_proj = [all q heads; all k heads; all v heads] gathered
    from both TP ranks' per-group rows, gate_up_proj = [gate; up], no split names, and transformers builds a
    Phi3ForCausalLM from the output (its logits are test_logits_match_megatron's)."""
    from transformers import AutoModelForCausalLM

    case = "phi3_tp2"
    out, m, cfg = converted(case), MANIFEST[case], base_config(MG / case)
    got = load_output(out)
    split = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert not [k for k in got if k.split(".")[-2] in split], "split names in a Phi-3 output"
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    assert m["tp"] == groups == 2, "the fixture should hold one query group per TP rank"
    for i in range(m["layers"]):
        qkv = got[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        assert qkv.shape[0] == (heads + 2 * groups) * hd
        assert got[f"model.layers.{i}.mlp.gate_up_proj.weight"].shape[0] == 2 * cfg["intermediate_size"]
    assert_same(got, reference(case), case)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Phi3ForCausalLM"


def test_te_norm_names_give_same_model(converted):
    """TE-fused norm names (layer_norm_weight) map to the same HF tensors as the local spec's."""
    assert_same(load_output(converted("qwen2_tp2_te_names")), load_output(converted("qwen2_tp2")), "te_names")


# --- input forms and subcommands ---------------------------------------------------------------------------

def input_forms(case, tmp_path):
    """The accepted spellings of one checkpoint: actor/, its iter_ folder, and an RLinf global_step_N/ holding
    actor/ (a copy, so the committed fixture keeps one layout)."""
    step = tmp_path / "global_step_1"
    shutil.copytree(MG / case / "actor", step / "actor")
    return {"actor": MG / case / "actor", "iter": MG / case / "actor" / ITER, "global_step": step}


@pytest.mark.parametrize("case", ["qwen2_tp2", "qwen2_tp2_pp2"])
@pytest.mark.parametrize("form", ["actor", "iter", "global_step"])
def test_input_forms(run, converted, tmp_path, case, form):
    src = input_forms(case, tmp_path)[form]
    out = tmp_path / "out"
    r = run("mg2hf", src, out, MG / case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), load_output(converted(case)), f"{case} via {form}")


def test_release_iteration(run, converted, tmp_path):
    """latest_checkpointed_iteration.txt = "release" names actor/release/ (Megatron's get_checkpoint_name; what
    HF-to-Megatron converters write)."""
    actor = tmp_path / "actor"
    shutil.copytree(MG / "qwen2_tp2" / "actor" / ITER, actor / "release")
    (actor / "latest_checkpointed_iteration.txt").write_text("release")
    out = tmp_path / "out"
    r = run("mg2hf", actor, out, MG / "qwen2_tp2" / "base_hf")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), load_output(converted("qwen2_tp2")), "release")


def test_latest_iteration_is_the_one_named(run, converted, tmp_path):
    """Two iterations of the same model: the tracker file decides, not the highest or the first folder."""
    actor = tmp_path / "actor"
    shutil.copytree(MG / "qwen2_tp2" / "actor" / ITER, actor / "iter_0000001")
    shutil.copytree(MG / "qwen2_tp2_padded" / "actor" / ITER, actor / "iter_0000002")  # a different model
    (actor / "latest_checkpointed_iteration.txt").write_text("1")
    out = tmp_path / "out"
    r = run("mg2hf", actor, out, MG / "qwen2_tp2" / "base_hf")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), load_output(converted("qwen2_tp2")), "latest=1")


@pytest.mark.parametrize("case", ["qwen2_tp1", "qwen2_tp2"])
def test_single_rank_file_never_half_converted(run, converted, tmp_path, case):
    """A user may point at one mp_rank_XX/model_optim_rng.pt. Converting it (TP=1 is the whole model) or finding
    its siblings is fine; refusing with exit 1 is fine; exiting 0 with Megatron-named or partial tensors is not.
    The base here has no weights, so no name check against base weights can save the day."""
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(MG / case / "base_hf" / "config.json", base / "config.json")
    out = tmp_path / "out"
    r = run("mg2hf", MG / case / "actor" / ITER / "mp_rank_00" / "model_optim_rng.pt", out, base)
    if r.returncode == 0:
        assert_same(load_output(out), load_output(converted(case)), f"{case} from one rank file")
    else:
        assert r.returncode == 1 and "panicked" not in r.stderr, r.stderr
        assert not out.exists() or not list(out.glob("*.safetensors")), "failed but left output behind"


def test_sharded_output(run, reference, tmp_path):
    """--max-shard-size splits the merged model into shards plus an index that transformers loads."""
    case = "qwen2_tp2_pp2"
    out = tmp_path / "out"
    r = run("convert", MG / case / "actor", out, "--base", MG / case / "base_hf", "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert (out / INDEX).exists() and len(shard_files(out)) > 1
    assert_same(load_output(out), reference(case), f"{case} sharded")
    got = hf_logits(out, torch.load(MG / case / "input_ids.pt"))
    assert (got - torch.load(MG / case / "reference_logits.pt")).abs().max().item() <= TOL["float32"]


@pytest.mark.parametrize("case", ["qwen2_tp2", "qwen3_tp2"])
def test_convert_with_base_equals_mg2hf(run, converted, tmp_path, case):
    out = tmp_path / "out"
    r = run("convert", MG / case / "actor", out, "--base", MG / case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), load_output(converted(case)), f"convert --base {case}")
    assert (out / "config.json").read_bytes() == (MG / case / "base_hf" / "config.json").read_bytes()


@pytest.mark.parametrize("case,flag,dtype", [("qwen2_tp2", "bf16", torch.bfloat16),
                                             ("qwen2_tp2_bf16", "fp32", torch.float32)])
def test_dtype_flag_overrides_base(run, reference, tmp_path, case, flag, dtype):
    """--dtype beats the base config's torch_dtype; values are the torch cast of the merged tensors."""
    out = tmp_path / "out"
    r = run("convert", MG / case / "actor", out, "--base", MG / case / "base_hf", "--dtype", flag)
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), reference(case, dtype), f"{case} --dtype {flag}")


@pytest.mark.parametrize("case", ["qwen2_tp2_pp2", "qwen3_tp2", "phi3_tp2"])
def test_inspect_lists_plan(run, case):
    r = run("inspect", MG / case / "actor", "--base", MG / case / "base_hf")
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    missing = [k for k in hf_skeleton(MG / case) if k not in text]
    assert not missing, f"inspect does not list planned tensors: {missing[:5]}"


def test_inspect_without_base(run):
    r = run("inspect", MG / "qwen2_tp2" / "actor")
    assert r.returncode == 0, r.stderr
    assert "layers" in (r.stdout + r.stderr).lower(), "inspect shows none of the args it read"


def _with_args(src, tmp_path, value, files):
    """A copy of `src` whose `args` (in each of `files`, found under it) are `value` instead of a Namespace."""
    dst = tmp_path / "actor"
    shutil.copytree(src, dst)
    for f in sorted(dst.rglob(files)):
        c = torch.load(f, weights_only=False)
        c["args"] = value
        torch.save(c, f)
    return dst


@pytest.mark.parametrize("value", [7, {"lr": 0.1}], ids=["int", "dict"])
def test_args_not_a_namespace(run, converted, tmp_path, value):
    """`args` that are not an argparse.Namespace (an int, a dict of other things) give no layout: without a base
    model that is an error naming the rank file the args came from (issue #16: it named no file); with one, the
    layout comes from tensor shapes and config.json and the model is the same."""
    actor = _with_args(MG / "qwen2_tp2" / "actor", tmp_path, value, "model_optim_rng.pt")
    r = run("inspect", actor)
    assert r.returncode == 1, r.stderr
    rank0 = actor / ITER / "mp_rank_00" / "model_optim_rng.pt"
    assert r.stderr.startswith(f"ckptconv: error[inconsistent]: {rank0}: inconsistent checkpoint: no hidden_size: "), r.stderr
    assert "args" in r.stderr and "--base" in r.stderr, r.stderr
    out = tmp_path / "out"
    r = run("mg2hf", actor, out, MG / "qwen2_tp2" / "base_hf")
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), load_output(converted("qwen2_tp2")), f"args = {value!r}")


def test_torch_dist_args_not_a_namespace(run, tmp_path):
    """The same in torch_dist: common.pt's `args` an int names common.pt."""
    actor = _with_args(MG / "qwen2_tp2_pp2" / "actor_dist", tmp_path, 7, "common.pt")
    r = run("inspect", actor, "--base", MG / "qwen2_tp2_pp2" / "base_hf")
    assert r.returncode == 1, r.stderr
    assert f"ckptconv: error[inconsistent]: {actor / ITER / 'common.pt'}: " in r.stderr, r.stderr


def test_deterministic(run, tmp_path):
    case = "qwen2_tp2_pp2"
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        r = run("mg2hf", MG / case / "actor", out, MG / case / "base_hf")
        assert r.returncode == 0, r.stderr
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], f"{name} differs between two runs"


# --- torch_dist (megatron's distributed checkpoint format) -------------------------------------------------
# The same models saved a second time with megatron-core's dist_checkpointing (actor_dist/): stacked layers,
# global tensors. The conversion must give the very bytes the rank files give, and megatron's logits. A copy saved
# with the distributed optimizer's state in the same folder (qwen2_tp2_optim) is generated per session.

DIST = sorted(c for c, m in MANIFEST.items() if m.get("dist"))


@pytest.mark.parametrize("case", DIST)
def test_python_reference_dist(case):
    """The fixture's torch_dist save, read back with plain torch.distributed.checkpoint and merged, equals the rank
    files' merge and reproduces megatron's logits."""
    self_check_dist(MG / case)


@pytest.mark.parametrize("case", DIST)
def test_torch_dist_gives_the_rank_files_bytes_and_megatron_logits(run, converted, tmp_path, case):
    out = tmp_path / "hf"
    r = run("mg2hf", MG / case / "actor_dist", out, MG / case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert "torch_dist" in r.stderr, r.stderr
    legacy = converted(case)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in legacy.iterdir())
    for p in sorted(legacy.iterdir()):
        assert (out / p.name).read_bytes() == p.read_bytes(), f"{case}: {p.name} differs from the rank files' output"
    got = hf_logits(out, torch.load(MG / case / "input_ids.pt"))
    diff = (got - torch.load(MG / case / "reference_logits.pt")).abs().max().item()
    assert diff <= TOL[MANIFEST[case]["dtype"]], f"{case}: max |HF(ckptconv) - megatron| = {diff}"


def test_torch_dist_dcp_to_pt_writes_it_as_saved(run, tmp_path):
    """dcp-to-pt is the mechanical DCP -> torch.save of RLinf's convert_dcp_to_pt.py (torch's dcp_to_torch_save):
    on a torch_dist folder it writes the stacked Megatron tensors, as torch.distributed.checkpoint reads them."""
    src = MG / "qwen2_tp2_pp2" / "actor_dist" / ITER
    r = run("dcp-to-pt", "--dcp_path", src, "--output_path", tmp_path / "model.pt")
    assert r.returncode == 0, r.stderr
    assert "mg2hf" in r.stderr, r.stderr
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), load_dist(src)[1], "dcp-to-pt of torch_dist")


@pytest.fixture(scope="session")
def optim_case(tmp_path_factory):
    """qwen2_tp2_optim, generated for this session (too big to commit): a torch_dist checkpoint saved WITH the
    optimizer state, as training saves it without --no-save-optim: megatron's DistributedOptimizer after one
    step, its dp_reshardable state (optimizer.distributed.* flat bucket tensors param / exp_avg / exp_avg_sq and
    ShardedObjects) in the same DCP files as the model, opt_param_scheduler in common.pt. About 15 s."""
    import subprocess

    out = tmp_path_factory.mktemp("optim")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_megatron_fixtures.py"), "--only", "qwen2_tp2_optim",
                        "--out", str(out), "--no-check"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"generating qwen2_tp2_optim failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return out / "qwen2_tp2_optim"


def test_torch_dist_with_optimizer_state(run, tmp_path, optim_case):
    """The optimizer state in the DCP folder is skipped: mg2hf converts the model alone, bit-identical to the
    plain-torch reading of the model tensors, with megatron's logits (taken after the optimizer step)."""
    self_check_optim(optim_case)  # the fixture is what it claims: non-zero optimizer state, right logits
    out = tmp_path / "hf"
    r = run("mg2hf", optim_case / "actor_dist", out, optim_case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert "torch_dist" in r.stderr, r.stderr
    assert_same(load_output(out), dist_merge(optim_case), "mg2hf of torch_dist with optimizer state")
    got = hf_logits(out, torch.load(optim_case / "input_ids.pt"))
    diff = (got - torch.load(optim_case / "reference_logits.pt")).abs().max().item()
    assert diff <= TOL["float32"], f"qwen2_tp2_optim: max |HF(ckptconv) - megatron| = {diff}"


@pytest.mark.parametrize("form", ["actor", "iter"])
def test_torch_dist_input_forms_and_inspect(run, tmp_path, form):
    case = "qwen2_tp2_pp2"
    src = MG / case / "actor_dist" / (ITER if form == "iter" else "")
    r = run("inspect", src, "--base", MG / case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert "Megatron-LM torch_dist checkpoint" in r.stdout, r.stdout
    assert "TP=2 x PP=2" in r.stdout, r.stdout
    missing = [k for k in hf_skeleton(MG / case) if k not in r.stdout]
    assert not missing, f"inspect does not list planned tensors: {missing[:5]}"
    # Like rank files, a torch_dist checkpoint needs its base model to be converted.
    r = run("convert", src, tmp_path / "out")
    assert r.returncode == 1 and "base" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# Broken Megatron folders (missing ranks, mismatched TP shards, a base model of another size...) are part of the
# hostile corpus: tests/hostile/megatron/, run by tests/e2e/test_hostile.py and wasi/test_wasi.py.
