"""End-to-end tests of `ckptconv convert` on Mixture-of-Experts checkpoints that FSDP training of a transformers 5
model writes: RLinf's DCP folder and full_weights.pt (experts fused: `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) and a per-expert `.pt` (the Hub's names), for Qwen3-MoE, Qwen2-MoE and Mixtral.

Owns: tests/e2e/test_moe_hf.py. Inputs: tests/fixtures/make_moe_hf_fixtures.py, run at test time (real FSDP2 on
gloo, real save_pretrained). Expectations come from the real libraries:
  - with --base, the output holds exactly the tensors `save_pretrained` wrote for the same weights (names,
    dtypes, shapes, bytes): the fused experts split per expert under the base's own names;
  - transformers' forward of the output gives the trained model's logits;
  - without --base, the fused names stay, and transformers 5 loads them as its own.
Run: .venv/bin/python -m pytest tests/e2e/test_moe_hf.py   (binary: env CKPTCONV, see conftest.py)
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_same, load_output

sys.path.insert(0, str(FIXTURES))
from make_megatron_fixtures import hf_logits  # noqa: E402

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]
INPUTS = {"full_weights": "global_step_1/actor/model_state_dict/full_weights.pt",
          "dcp": "global_step_1/actor/dcp_checkpoint", "per_expert": "per_expert.pt"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_hf")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_moe_hf_fixtures.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"make_moe_hf_fixtures.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return out


def logits_diff(out, case):
    got = hf_logits(out, torch.load(case / "input_ids.pt"))
    return (got - torch.load(case / "reference_logits.pt")).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_with_base_the_names_are_the_bases(run, root, tmp_path, family, kind):
    case = root / family
    out = tmp_path / "hf"
    r = run("convert", case / INPUTS[kind], out, "--base", case / "base_hf")
    assert r.returncode == 0, r.stderr
    assert "names and shapes match the base model's" in r.stderr
    if kind != "per_expert":
        assert "fused expert tensors split per expert" in r.stderr
    assert_same(load_output(out), load_file(case / "base_hf" / "model.safetensors"), f"{family}/{kind}")
    assert logits_diff(out, case) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_without_base_fused_names_stay_and_load(run, root, tmp_path, family):
    case = root / family
    out = tmp_path / "hf"
    r = run("convert", case / INPUTS["full_weights"], out)
    assert r.returncode == 0, r.stderr
    got = load_output(out)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in got)
    (out / "config.json").write_bytes((case / "base_hf" / "config.json").read_bytes())
    assert logits_diff(out, case) <= 1e-4


def test_bf16_cast_splits_the_same_way(run, root, tmp_path):
    case = root / "qwen3_moe"
    out = tmp_path / "hf"
    r = run("convert", case / INPUTS["dcp"], out, "--base", case / "base_hf", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    want = {k: v.to(torch.bfloat16) for k, v in load_file(case / "base_hf" / "model.safetensors").items()}
    assert_same(load_output(out), want, "qwen3_moe/dcp bf16")
