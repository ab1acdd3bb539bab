"""End-to-end tests of `ckptconv convert` on vision-language checkpoints from RLinf's FSDP2 training (issue 18):
the DCP folder, the global_step folder and model_state_dict/full_weights.pt of a tiny Qwen2.5-VL and of an
OpenVLA-OFT-shaped model, converted with `--base`.

Owns: tests/e2e/test_vlm.py. Inputs: tests/fixtures/make_vlm_fixtures.py, run once per session at test time (real
FSDP2 on gloo, real save_pretrained; about 30 s). Expectations come from the real libraries:
  - with --base, the output holds exactly the tensors transformers 5's `save_pretrained` wrote for the trained
    weights (names, dtypes, shapes, bytes): for Qwen2.5-VL the Hub's names `visual.*`, `model.*`, `lm_head.weight`,
    while the checkpoints carry the state-dict names `model.visual.*`, `model.language_model.*`;
  - transformers 5 loads the output with no missing, unexpected or mismatched keys and its forward gives the
    trained FSDP model's logits (text only and with an image);
  - `--dtype bf16`: the same tensors cast, config.json says bfloat16, and transformers loads it as bf16;
  - OpenVLA-OFT (a real-module stand-in, see the fixture's docstring): the state-dict names unchanged, RLinf's
    save-helper files, and the module's forward from the output reproduces the reference.
Run: .venv/bin/python -m pytest tests/e2e/test_vlm.py   (binary: env CKPTCONV, see conftest.py)
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_same, load_output

sys.path.insert(0, str(FIXTURES))
from make_vlm_fixtures import OpenVLAOFTLike, openvla_forward, qwen25vl_logits  # noqa: E402

INPUTS = {"dcp": "global_step_1/actor/dcp_checkpoint", "global_step": "global_step_1",
          "full_weights": "global_step_1/actor/model_state_dict/full_weights.pt"}


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_vlm_fixtures.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"make_vlm_fixtures.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return out


def convert(run, src, out, *flags):
    r = run("convert", src, out, *flags)
    assert r.returncode == 0, f"ckptconv convert {src.name} failed (exit {r.returncode}):\n{r.stderr}"
    return r


# --- Qwen2.5-VL ------------------------------------------------------------------------------------------

def load_qwen(folder, dtype=torch.float32):
    """transformers 5's own loading of a folder, with its report of missing/unexpected/mismatched keys."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"transformers loading {folder}: {bad}"
    return model.eval()


def qwen_logits_diff(folder, case):
    got = qwen25vl_logits(load_qwen(folder), torch.load(case / "inputs.pt"))
    ref = torch.load(case / "reference_logits.pt")
    return {k: (got[k] - ref[k]).abs().max().item() for k in ref}


def dtype_fields(obj, path=""):
    """Every dtype / torch_dtype entry of a config, nested ones (text_config, vision_config) included."""
    found = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("dtype", "torch_dtype"):
                found[f"{path}{k}"] = v
            else:
                found.update(dtype_fields(v, f"{path}{k}."))
    return found


@pytest.mark.parametrize("kind", list(INPUTS))
def test_qwen25vl_with_base_is_save_pretrained(run, root, tmp_path, kind):
    case = root / "qwen25vl"
    out = tmp_path / "hf"
    convert(run, case / INPUTS[kind], out, "--base", case / "base")
    assert_same(load_output(out), load_file(case / "trained_hf" / "model.safetensors"), f"qwen25vl/{kind}")
    assert json.loads((out / "config.json").read_text()) == json.loads((case / "base" / "config.json").read_text())


@pytest.mark.parametrize("kind", list(INPUTS))
def test_qwen25vl_loads_and_reproduces_logits(run, root, tmp_path, kind):
    case = root / "qwen25vl"
    out = tmp_path / "hf"
    convert(run, case / INPUTS[kind], out, "--base", case / "base")
    diffs = qwen_logits_diff(out, case)
    assert all(d <= 1e-6 for d in diffs.values()), f"max abs logit diff {diffs}"


def test_qwen25vl_without_base_state_dict_names_load(run, root, tmp_path):
    """No --base: the checkpoint's own names (model.visual.*, model.language_model.*) stay, and transformers 5
    still loads them as its own with the base's config beside them."""
    case = root / "qwen25vl"
    out = tmp_path / "hf"
    convert(run, case / INPUTS["dcp"], out)
    got = load_output(out)
    want = torch.load(case / INPUTS["full_weights"], weights_only=True)
    assert_same(got, want, "qwen25vl/dcp without --base")
    shutil.copy(case / "base" / "config.json", out / "config.json")
    diffs = qwen_logits_diff(out, case)
    assert all(d <= 1e-6 for d in diffs.values()), f"max abs logit diff {diffs}"


@pytest.mark.parametrize("kind", ["dcp", "full_weights"])
def test_qwen25vl_bf16(run, root, tmp_path, kind):
    case = root / "qwen25vl"
    out = tmp_path / "hf"
    convert(run, case / INPUTS[kind], out, "--base", case / "base", "--dtype", "bf16")
    want = {k: v.to(torch.bfloat16) for k, v in load_file(case / "trained_hf" / "model.safetensors").items()}
    assert_same(load_output(out), want, f"qwen25vl/{kind} bf16")
    fields = dtype_fields(json.loads((out / "config.json").read_text()))
    assert fields and all(v == "bfloat16" for v in fields.values()), f"config.json dtype entries: {fields}"
    model = load_qwen(out, dtype="auto")
    assert model.dtype == torch.bfloat16, model.dtype
    # transformers' own bf16 model of the expected weights computes the same logits.
    inputs = torch.load(case / "inputs.pt")
    got, ref = qwen25vl_logits(model, inputs), qwen25vl_logits(load_qwen(case / "trained_hf", torch.bfloat16), inputs)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# --- OpenVLA-OFT -----------------------------------------------------------------------------------------

HELPERS = {"vision_backbone.": "vision_backbone--0_checkpoint.pt", "proprio_projector.": "proprio_projector--0_checkpoint.pt"}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_openvla_oft_with_base_and_save_helpers(run, root, tmp_path, kind):
    case = root / "openvla_oft"
    out = tmp_path / "hf"
    convert(run, case / INPUTS[kind], out, "--base", case / "base", "--model-type", "openvla_oft",
            "--use-film", "--use-proprio")
    got = load_output(out)
    assert_same(got, load_file(case / "expected.safetensors"), f"openvla_oft/{kind}")
    for name in ("config.json", "dataset_statistics.json"):
        assert (out / name).read_bytes() == (case / "base" / name).read_bytes(), f"{name} not copied"
    for prefix, file in HELPERS.items():
        want = {k[len(prefix):]: v for k, v in got.items() if k.startswith(prefix)}
        assert_same(torch.load(out / file, weights_only=True), want, file)
    model = OpenVLAOFTLike()
    model.load_state_dict(got, strict=True)
    res, ref = openvla_forward(model.eval(), torch.load(case / "inputs.pt")), torch.load(case / "reference.pt")
    diffs = {k: (res[k] - ref[k]).abs().max().item() for k in ref}
    assert all(d <= 1e-6 for d in diffs.values()), f"max abs diff {diffs}"
