"""End-to-end tests of `ckptconv mg2hf` on Megatron Mixture-of-Experts checkpoints: legacy rank files split by
tensor, pipeline and expert parallelism (SequentialMLP and the legacy GroupedMLP), and the same models saved as
torch_dist.

Owns: tests/e2e/test_megatron_moe.py. Inputs: tests/fixtures/make_megatron_moe_fixtures.py ->
tests/fixtures/megatron_moe/, REAL megatron-core MoE GPT models (Qwen3-MoE at EP2, EP2 x TP2, EP2 x PP2 and with
GroupedMLP; Qwen2-MoE with a gated shared expert; Mixtral). Expectations never come from hard-coded values:
  - logits: transformers' float32 forward of ckptconv's output reproduces megatron's own forward within 1e-4;
  - tensors: bit-identical to merge_moe_to_hf, the fixture script's plain-torch merge (itself checked against
    megatron's logits, test_python_reference);
  - names/shapes: what transformers loads from the folder with no missing or unexpected keys;
  - legacy and torch_dist conversions of the same model: byte-identical.
Broken inputs are copies of qwen3moe_ep2 edited with plain torch, each refused naming the file and the problem.
Run: .venv/bin/python -m pytest tests/e2e/test_megatron_moe.py   (binary: env CKPTCONV, see conftest.py)
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import manifest
from conftest import FIXTURES, assert_same, load_output

sys.path.insert(0, str(FIXTURES))
from make_megatron_fixtures import hf_logits  # noqa: E402
from make_megatron_moe_fixtures import check_hf_load, merge_moe_to_hf, self_check  # noqa: E402

MOE = FIXTURES / "megatron_moe"
MANIFEST = json.loads((MOE / "manifest.json").read_text())
CASES = sorted(MANIFEST)
DIST = sorted(c for c in CASES if (MOE / c / "actor_dist").exists())
ITER = "iter_0000001"


def mg2hf(binary, case, src, out, *extra):
    r = subprocess.run([binary, "mg2hf", MOE / case / src, out, MOE / case / "base_hf", *extra],
                       capture_output=True, text=True, timeout=300)
    return r


@pytest.fixture(scope="module")
def converted(binary, tmp_path_factory):
    cache = {}

    def _converted(case, src="actor"):
        if (case, src) not in cache:
            out = tmp_path_factory.mktemp(f"{case}_{src}") / "hf"
            r = mg2hf(binary, case, src, out)
            assert r.returncode == 0, f"mg2hf {case}/{src} failed ({r.returncode}):\n{r.stderr[-4000:]}"
            manifest.record(["mg2hf", case, src], out=out, key=f"mg2hf moe {case}/{src}")
            cache[(case, src)] = (out, r.stderr)
        return cache[(case, src)][0]
    return _converted


@pytest.mark.parametrize("case", CASES)
def test_python_reference(case):
    """The plain-torch merge reproduces megatron's logits (and its negative controls do not): if this fails, the
    fixtures are wrong, not ckptconv."""
    self_check(MOE / case)


@pytest.mark.parametrize("case", CASES)
def test_logits_and_tensors_match(converted, case):
    out = converted(case)
    got = hf_logits(out, torch.load(MOE / case / "input_ids.pt"))
    want = torch.load(MOE / case / "reference_logits.pt")
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |HF(ckptconv) - megatron| = {diff}"
    assert_same(load_output(out), merge_moe_to_hf(MOE / case), case)
    check_hf_load(out)


@pytest.mark.parametrize("case", DIST)
def test_torch_dist_gives_the_rank_files_bytes(converted, case):
    legacy, dist = converted(case), converted(case, "actor_dist")
    assert sorted(p.name for p in dist.iterdir()) == sorted(p.name for p in legacy.iterdir())
    for p in sorted(legacy.iterdir()):
        assert (dist / p.name).read_bytes() == p.read_bytes(), f"{case}: {p.name} differs from the rank files'"


@pytest.mark.parametrize("case", ["qwen3moe_ep2_tp2", "qwen3moe_tp2_etp1_ep2", "qwen2moe_ep2", "mixtral_ep2"])
def test_inspect_shows_the_moe_layout(run, case):
    r = run("inspect", MOE / case / "actor", "--base", MOE / case / "base_hf")
    assert r.returncode == 0, r.stderr
    m = MANIFEST[case]
    assert f"MoE: {m['num_experts']} experts (top-{m['topk']})" in r.stdout + r.stderr
    assert f"EP={m['ep']} x expert TP={m['etp']}" in r.stdout + r.stderr
    names = r.stdout
    expert = "block_sparse_moe.experts.3.w2.weight" if case == "mixtral_ep2" else "mlp.experts.3.down_proj.weight"
    assert f"model.layers.1.{expert}" in names


def test_inspect_without_base_guesses_the_moe_family(run):
    r = run("inspect", MOE / "qwen3moe_ep2" / "actor")
    assert r.returncode == 0, r.stderr
    assert "Qwen3-MoE layout" in r.stdout + r.stderr


# --- broken inputs -----------------------------------------------------------------------------------------

def broken_copy(tmp_path, case="qwen3moe_ep2", root=MOE):
    dst = tmp_path / case
    shutil.copytree(root / case, dst)
    return dst


def edit_base_config(case_dir, **changes):
    path = case_dir / "base_hf" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def edit_rank(path, edit):
    sd = torch.load(path, weights_only=False)
    edit(sd)
    torch.save(sd, path)


def refused(binary, case_dir, tmp_path, *needles, src="actor"):
    out = tmp_path / "out"
    r = subprocess.run([binary, "mg2hf", case_dir / src, out, case_dir / "base_hf"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, f"accepted:\n{r.stderr}"
    assert "panicked" not in r.stderr
    for n in needles:
        assert n in r.stderr, f"{n!r} not in:\n{r.stderr}"
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.iterdir())}"
    return r.stderr


def test_missing_ep_rank(binary, tmp_path):
    d = broken_copy(tmp_path)
    shutil.rmtree(d / "actor" / ITER / "mp_rank_00_001")
    refused(binary, d, tmp_path, "mp_rank_00_001/model_optim_rng.pt is missing", "EP")


def test_expert_count_disagrees_with_args(binary, tmp_path):
    """An EP rank holding 3 local experts where num_experts 4 / EP 2 says 2."""
    d = broken_copy(tmp_path)
    path = d / "actor" / ITER / "mp_rank_00_001" / "model_optim_rng.pt"

    def extra_expert(sd):
        m = sd["model"]
        for k in [k for k in m if ".local_experts.1." in k]:
            m[k.replace(".local_experts.1.", ".local_experts.2.")] = m[k]  # None for _extra_state
    edit_rank(path, extra_expert)
    refused(binary, d, tmp_path, "mp_rank_00_001/model_optim_rng.pt", "local experts [0, 1, 2]",
            "num_experts 4 over expert_model_parallel_size 2 is 2 per rank")


def test_args_experts_disagree_with_ranks(binary, tmp_path):
    """args say 8 experts (4 per EP rank) but each rank holds 2: named, not a silent half model."""
    d = broken_copy(tmp_path)
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        edit_rank(d / "actor" / ITER / rank / "model_optim_rng.pt", lambda sd: setattr(sd["args"], "num_experts", 8))
    refused(binary, d, tmp_path, "num_experts")


def test_unknown_expert_tensor(binary, tmp_path):
    d = broken_copy(tmp_path)
    path = d / "actor" / ITER / "mp_rank_00_001" / "model_optim_rng.pt"
    edit_rank(path, lambda sd: sd["model"].__setitem__(
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc3.weight", torch.zeros(4, 4)))
    refused(binary, d, tmp_path, "mp_rank_00_001/model_optim_rng.pt",
            "decoder.layers.0.mlp.experts.local_experts.0.linear_fc3.weight", "no Hugging Face equivalent")


def test_unknown_router_tensor(binary, tmp_path):
    d = broken_copy(tmp_path)
    path = d / "actor" / ITER / "mp_rank_00_000" / "model_optim_rng.pt"
    edit_rank(path, lambda sd: sd["model"].__setitem__("decoder.layers.1.mlp.router.z_bias", torch.zeros(4)))
    refused(binary, d, tmp_path, "decoder.layers.1.mlp.router.z_bias", "no Hugging Face equivalent")


def test_dense_copy_differs_in_shape_on_an_ep_rank(binary, tmp_path):
    d = broken_copy(tmp_path)
    path = d / "actor" / ITER / "mp_rank_00_001" / "model_optim_rng.pt"
    edit_rank(path, lambda sd: sd["model"].__setitem__("decoder.layers.0.mlp.router.weight", torch.zeros(4, 31)))
    refused(binary, d, tmp_path, "mp_rank_00_001/model_optim_rng.pt", "decoder.layers.0.mlp.router.weight",
            "rank (TP 0, EP 1) has shape [4, 31]")


def test_routing_mismatch_with_base_config(binary, tmp_path):
    """Qwen3-MoE renormalises the top-k; a base config saying norm_topk_prob false describes another model."""
    d = broken_copy(tmp_path)
    edit_base_config(d, norm_topk_prob=False)
    refused(binary, d, tmp_path, "base_hf/config.json", "moe_router_pre_softmax")


def test_dense_base_for_a_moe_checkpoint(binary, tmp_path):
    d = broken_copy(tmp_path)
    edit_base_config(d, model_type="qwen3")
    refused(binary, d, tmp_path, "Mixture-of-Experts", "Qwen3 model has no experts")


def test_torch_dist_expert_count_disagrees_with_args(binary, tmp_path):
    d = broken_copy(tmp_path)
    common = d / "actor_dist" / ITER / "common.pt"
    sd = torch.load(common, weights_only=False)
    args = sd["args"]
    if isinstance(args, dict):
        args["num_experts"] = 8
    else:
        args.num_experts = 8
    torch.save(sd, common)
    refused(binary, d, tmp_path, "mlp.experts.experts.linear_fc1.weight", "num_experts = 8", src="actor_dist")


@pytest.mark.parametrize("case,needle", [("qwen3moe_ep2", "args give an expert (gate) projection of [8, 32]"),
                                         ("qwen3moe_grouped_ep2", "is not 2 stacked blocks of [32, 16]")])
def test_expert_size_disagrees_with_args(binary, tmp_path, case, needle):
    """args (and the base config) say an expert's ffn is 8, the tensors hold 16: refused, not cut to size."""
    d = broken_copy(tmp_path, case)
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        edit_rank(d / "actor" / ITER / rank / "model_optim_rng.pt",
                  lambda sd: setattr(sd["args"], "moe_ffn_hidden_size", 8))
    edit_base_config(d, moe_intermediate_size=8)
    refused(binary, d, tmp_path, "model_optim_rng.pt", needle)


# --- Transformer Engine's TEGroupedMLP names ----------------------------------------------------------------

def te_grouped_names(sd):
    """qwen3moe_ep2's rank file as TEGroupedMLP names it: Transformer Engine has no CPU build, so no real
    megatron-core run on this machine can write it. TE's GroupedLinear registers one parameter per local expert,
    weight0..weight{E_local-1} (megatron/core/extensions/transformer_engine.py, _sharded_state_dict_grouped reads
    full_state_dict[f"weight{gemm_idx}"]), each shaped and split over TP as SequentialMLP's expert linear is, plus
    one `_extra_state` per GroupedLinear (TE's fp8 metadata, a BytesIO)."""
    import io
    import re

    model = {}
    for k, v in sd["model"].items():
        m = re.match(r"(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|_extra_state)$", k)
        if not m:
            model[k] = v
        elif m[4] == "weight":
            model[f"{m[1]}{m[3]}.weight{m[2]}"] = v
        else:
            model[f"{m[1]}{m[3]}._extra_state"] = io.BytesIO(b"")
    sd["model"] = model


def test_te_grouped_names_give_the_same_model(binary, converted, tmp_path):
    d = broken_copy(tmp_path)
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        edit_rank(d / "actor" / ITER / rank / "model_optim_rng.pt", te_grouped_names)
    keys = torch.load(d / "actor" / ITER / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight1" in keys
    out = tmp_path / "out"
    r = subprocess.run([binary, "mg2hf", d / "actor", out, d / "base_hf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = converted("qwen3moe_ep2")
    for p in sorted(want.iterdir()):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_te_grouped_expert_count_disagrees_with_args(binary, tmp_path):
    d = broken_copy(tmp_path)
    path = d / "actor" / ITER / "mp_rank_00_000" / "model_optim_rng.pt"

    def three(sd):
        te_grouped_names(sd)
        m = sd["model"]
        for fc in ("linear_fc1", "linear_fc2"):
            m[f"decoder.layers.0.mlp.experts.{fc}.weight2"] = m[f"decoder.layers.0.mlp.experts.{fc}.weight1"]
    edit_rank(path, three)
    edit_rank(d / "actor" / ITER / "mp_rank_00_001" / "model_optim_rng.pt", te_grouped_names)
    refused(binary, d, tmp_path, "mp_rank_00_000/model_optim_rng.pt", "local experts [0, 1, 2]")


# --- DeepSeek-V3: Multi-Latent Attention, sigmoid router with expert bias, shared expert, first layer dense -----

MLA = FIXTURES / "megatron_mla"
MLA_CASES = sorted(json.loads((MLA / "manifest.json").read_text()))


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_python_reference(case):
    from make_megatron_mla_fixtures import self_check as mla_self_check

    mla_self_check(MLA / case)


@pytest.mark.parametrize("case", MLA_CASES)
@pytest.mark.parametrize("src", ["actor", "actor_dist"])
def test_mla_logits_tensors_and_torch_dist(binary, tmp_path, case, src):
    from make_megatron_mla_fixtures import merge_mla_to_hf

    out = tmp_path / "hf"
    r = subprocess.run([binary, "mg2hf", MLA / case / src, out, MLA / case / "base_hf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest.record(["mg2hf", case, src], out=out, key=f"mg2hf mla {case}/{src}")
    assert "DeepSeek-V3 layout" in r.stderr and "MoE: 8 experts (top-2)" in r.stderr
    got = hf_logits(out, torch.load(MLA / case / "input_ids.pt"))
    diff = (got - torch.load(MLA / case / "reference_logits.pt")).abs().max().item()
    assert diff <= 1e-4, f"{case}/{src}: max |HF(ckptconv) - megatron| = {diff}"
    assert_same(load_output(out), merge_mla_to_hf(MLA / case), f"{case}/{src}")
    check_hf_load(out)


@pytest.mark.parametrize("edit,needles", [
    ({"first_k_dense_replace": 0}, ["first_k_dense_replace = 0", "dense (router-less) layers are [0]"]),
    ({"rope_interleave": False}, ["rope_interleave"]),
    ({"kv_lora_rank": 32}, ["kv_lora_rank = 16", "says 32"]),
    ({"n_group": 4}, ["moe_router_num_groups = 2", "says 4"]),
    ({"n_shared_experts": 2}, ["moe_shared_expert_intermediate_size = 16", "says 32"]),
], ids=["first_k_dense", "rope_interleave", "kv_lora_rank", "n_group", "n_shared_experts"])
def test_mla_base_config_disagrees(binary, tmp_path, edit, needles):
    """A DeepSeek-V3 base config that describes another model than the checkpoint: refused, naming config.json."""
    d = broken_copy(tmp_path, "deepseek_v3_ep2", MLA)
    edit_base_config(d, **edit)
    refused(binary, d, tmp_path, "base_hf/config.json", *needles)


def test_mla_missing_projection(binary, tmp_path):
    d = broken_copy(tmp_path, "deepseek_v3_ep2", MLA)
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        edit_rank(d / "actor" / ITER / rank / "model_optim_rng.pt",
                  lambda sd: sd["model"].pop("decoder.layers.1.self_attention.linear_kv_up_proj.weight"))
    refused(binary, d, tmp_path, "decoder.layers.1.self_attention.linear_kv_up_proj.weight", "is missing")


def test_mla_unknown_attention_tensor(binary, tmp_path):
    d = broken_copy(tmp_path, "deepseek_v3_ep2", MLA)
    edit_rank(d / "actor" / ITER / "mp_rank_00_000" / "model_optim_rng.pt",
              lambda sd: sd["model"].__setitem__("decoder.layers.0.self_attention.linear_kv_up_proj.bias",
                                                 torch.zeros(64)))
    refused(binary, d, tmp_path, "decoder.layers.0.self_attention.linear_kv_up_proj.bias", "no Hugging Face equivalent")


def test_mla_checkpoint_with_a_gqa_family_base(binary, tmp_path):
    """The DeepSeek-V3 checkpoint against a base that says qwen3_moe: the attention kinds differ."""
    d = broken_copy(tmp_path, "deepseek_v3_ep2", MLA)
    edit_base_config(d, model_type="qwen3_moe")
    refused(binary, d, tmp_path, "has Multi-Latent Attention", "Qwen3-MoE model has no")


def test_expert_tp1_missing_folder(binary, tmp_path):
    """TP 2, expert TP 1, EP 2 saves only mp_rank_00_000 and mp_rank_01_001; without the second, TP rank 1's dense
    half and EP rank 1's experts are gone."""
    d = broken_copy(tmp_path, "qwen3moe_tp2_etp1_ep2")
    shutil.rmtree(d / "actor" / ITER / "mp_rank_01_001")
    refused(binary, d, tmp_path, "no rank folder holds tensor-parallel rank 1 of stage 0")


def test_expert_tp1_copies_must_agree_in_shape(binary, tmp_path):
    """Under expert TP 1, a second folder of the same EP rank holds the same whole experts: a reshaped copy is named."""
    d = broken_copy(tmp_path, "qwen3moe_tp2_etp1_ep2")
    it = d / "actor" / ITER
    shutil.copytree(it / "mp_rank_00_000", it / "mp_rank_01_000")
    path = it / "mp_rank_01_000" / "model_optim_rng.pt"
    src = torch.load(it / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)

    def as_tp1_ep0(sd):  # TP rank 1's dense half (from mp_rank_01_001), EP rank 0's experts with one reshaped
        for k, v in src["model"].items():
            if ".mlp.experts." not in k:
                sd["model"][k] = v
        sd["model"]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"] = torch.zeros(32, 8)
    edit_rank(path, as_tp1_ep0)
    refused(binary, d, tmp_path, "mp_rank_01_000/model_optim_rng.pt",
            "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", "rank (TP 1, EP 0) has shape [32, 8]")
