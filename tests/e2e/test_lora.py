"""End-to-end tests of ckptconv on PEFT LoRA checkpoints: merge, adapter export, --base packaging,
`pt2hf` driven by RLinf's fsdp_model_convertor.yaml, the openvla_oft save helper, and bad inputs.

Owns: tests/e2e/test_lora.py. Inputs: tests/fixtures/make_lora_fixtures.py -> tests/fixtures/lora/ (a tiny real
transformers Qwen2 with a real tokenizer, a real peft LoRA r=4 alpha=8 saved with torch.save the way RLinf
saves full_weights.pt, peft's own save_pretrained of the adapter, an openvla-like toy, RLinf's YAML).
Expectations never come from hard-coded values:
  - logits: transformers / peft loading ckptconv's output must reproduce peft's own models
    (reference.safetensors: merge_and_unload, the unmerged PeftModel) within 1e-4 (fp32) / 5e-2 (bf16);
    test_reference_is_peft re-derives the reference and checks that the tolerances separate a right merge
    from a wrong one (no merge, wrong alpha);
  - tensors: W + (alpha/r)·B·A computed by torch in f32 and rounded once, peft's merged state dict, peft's
    saved adapter file, torch.load of the input;
  - names/shapes: the base folder's own weights; LoRA numbers r/alpha: lora_path/adapter_config.json.
Run: .venv/bin/python -m pytest tests/e2e/test_lora.py   (binary: env CKPTCONV, see conftest.py)
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, INDEX, assert_same, load_output, tensor_bytes

L = FIXTURES / "lora"
BASE, TIED = L / "base_qwen2", L / "base_qwen2_tied"
CKPT, CKPT_BF16, CKPT_TIED = L / "full_weights.pt", L / "full_weights_bf16.pt", L / "full_weights_tied.pt"
LORA_PATH = L / "lora_path"
TOY = L / "openvla_toy"
CONFIGS = L / "configs"
RLINF_YAML = CONFIGS / "fsdp_model_convertor.yaml"
REF = load_file(L / "reference.safetensors")
ADAPTER_CFG = json.loads((LORA_PATH / "adapter_config.json").read_text())
R, ALPHA = ADAPTER_CFG["r"], ADAPTER_CFG["lora_alpha"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
PEFT_PREFIX = "base_model.model."
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
LORA_LINE = re.compile(r"LoRA r = (\d+) \(from ([^)]*)\), alpha = ([0-9.]+) \(from ([^)]*)\)")


# --- helpers ---------------------------------------------------------------------------------------------

def ok(r, what=""):
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def failed_cleanly(r, out, *needles, what="", wrong=()):
    """Exit 1, every needle in stderr (case-insensitive), none of the `wrong` diagnoses, no output left behind."""
    assert r.returncode == 1, f"{what}: expected exit 1, got {r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    low = r.stderr.lower()
    for n in needles:
        assert n.lower() in low, f"{what}: stderr does not mention {n!r}:\n{r.stderr[-3000:]}"
    for n in wrong:
        assert n.lower() not in low, f"{what}: stderr blames the wrong thing ({n!r}):\n{r.stderr[-3000:]}"
    left = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*")) if Path(out).exists() else []
    assert not left, f"{what}: files left in {out}: {left}"


def lora_numbers(stderr):
    """(r, r_source, alpha, alpha_source) from the 'LoRA r = .. (from ..), alpha = .. (from ..)' line."""
    m = LORA_LINE.search(stderr)
    assert m, f"no 'LoRA r = .., alpha = ..' line on stderr:\n{stderr}"
    return int(m[1]), m[2], float(m[3]), m[4]


def base_weight_files(base):
    return {p.name for p in base.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)}


def package_files(base):
    """Everything in a base folder that is not weights: what ckptconv must copy byte for byte."""
    return {p.name for p in base.iterdir() if p.is_file() and p.name not in base_weight_files(base)}


def base_weight_shapes(base):
    """name -> shape of the base folder's own weights, read with safetensors / torch."""
    out = {}
    for f in sorted(base.glob("*.safetensors")):
        out.update({k: tuple(v.shape) for k, v in load_file(f).items()})
    if (base / "pytorch_model.bin").exists():
        out.update({k: tuple(v.shape) for k, v in torch.load(base / "pytorch_model.bin", weights_only=True).items()})
    return out


@torch.no_grad()
def hf_logits(out_dir, dtype):
    """transformers' logits of the converted folder; loading must use every tensor and miss none."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{out_dir}: transformers did not load cleanly: {bad}"
    return model.eval()(input_ids=REF["input_ids"]).logits.float()


@torch.no_grad()
def peft_logits(base, adapter_dir, dtype):
    """peft's own loader: PeftModel.from_pretrained(base model, adapter folder). autocast_adapter_dtype=False
    keeps a bf16 adapter in bf16 (peft would upcast it to f32), so the model is the reference PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter_dir,
                                      autocast_adapter_dtype=False).eval()
    return model(input_ids=REF["input_ids"]).logits.float()


def assert_logits(got, ref_key, dtype, what):
    diff = (got - REF[ref_key]).abs().max().item()
    assert diff <= TOL[dtype], f"{what}: max |logits - peft {ref_key}| = {diff:.3g} > {TOL[dtype]}"


def load_pt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def torch_merge(sd, alpha, r, out_dtype=None):
    """FORMATS.md §4 in plain torch: plain HF names, W + (alpha/r)·B·A in f32, rounded once to the output dtype."""
    out, scale = {}, alpha / r
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        name = k.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        dtype = out_dtype if out_dtype is not None and v.is_floating_point() else v.dtype
        if k.endswith(".base_layer.weight"):  # the LoRA'd Linear's bias (q/k/v_proj have one) is left as is
            m = k.removesuffix(".base_layer.weight")
            a, b = sd[f"{m}.lora_A.default.weight"].float(), sd[f"{m}.lora_B.default.weight"].float()
            out[name] = (v.float() + scale * (b @ a)).to(dtype)
        else:
            out[name] = v.to(dtype)
    return out


def assert_merged_close(got, want, what):
    """Same names/dtypes/shapes; f32 within float noise of the summation order, bf16/f16 within one ulp
    (rounding once from nearly the same f32 value), untouched tensors bit-identical."""
    assert sorted(got) == sorted(want), f"{what}: names differ: only out {sorted(set(got) - set(want))}, only torch {sorted(set(want) - set(got))}"
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}:{k}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}"
        if tensor_bytes(g) == tensor_bytes(w):
            continue
        if w.dtype == torch.float32:
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-6), f"{what}:{k}: max diff {(g - w).abs().max():.3g}"
        elif w.dtype in (torch.bfloat16, torch.float16):
            ulps = (g.view(torch.int16).int() - w.view(torch.int16).int()).abs().max().item()
            assert ulps <= 1, f"{what}:{k}: {ulps} ulps from torch's single rounding"
        else:
            raise AssertionError(f"{what}:{k}: bytes differ")


def write_yaml(dst, src=RLINF_YAML, **subst):
    """RLinf's YAML with its /path/to placeholders (or any other literal text) replaced; the rest verbatim."""
    text = src.read_text()
    for old, new in subst.items():
        assert old in text, f"{old!r} not in {src}"
        text = text.replace(old, str(new))
    Path(dst).write_text(text)
    return dst


PLACEHOLDER = {"ckpt": "/path/to/full_weights.pt", "save": "/path/to/save",
               "model": "/path/to/Openvla-oft-SFT-libero-goal-traj1", "lora": "/path/to/lora_adapter"}


def rlinf_yaml(dst, ckpt, save, model, lora, extra=None):
    """RLinf's YAML with only the four paths substituted (model_path keeps its trailing slash)."""
    subst = {PLACEHOLDER["ckpt"]: ckpt, PLACEHOLDER["save"]: save, PLACEHOLDER["model"]: model, PLACEHOLDER["lora"]: lora}
    subst.update(extra or {})
    return write_yaml(dst, **subst)


# --- the fixtures themselves -----------------------------------------------------------------------------

def test_reference_is_peft():
    """reference.safetensors is what peft computes from the committed files, and the tolerances separate a
    right merge from the likely wrong ones (no merge; alpha ignored, i.e. alpha = r)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=ADAPTER_CFG["target_modules"]))
    model.load_state_dict(load_pt(CKPT), strict=True)
    with torch.no_grad():
        merged = model.merge_and_unload().eval()(input_ids=REF["input_ids"]).logits
    assert (merged - REF["merged_fp32"]).abs().max() < 1e-5
    assert R != ALPHA, "fixtures must have alpha != r, or a tool ignoring alpha would pass"
    for wrong in ("base_fp32", "merged_alpha_eq_r_fp32"):
        assert (REF["merged_fp32"] - REF[wrong]).abs().max() > 10 * TOL[torch.bfloat16], wrong
        assert (REF["merged_bf16"] - REF[wrong]).abs().max() > 10 * TOL[torch.bfloat16], wrong


# --- 1. merge --------------------------------------------------------------------------------------------

def _base_with_adapter_config(tmp_path):
    base = tmp_path / "base_with_adapter_config"
    shutil.copytree(BASE, base)
    shutil.copy(LORA_PATH / "adapter_config.json", base)
    return base


@pytest.mark.parametrize("how", ["lora-path", "flags", "base-adapter-config"])
def test_merge_fp32_matches_peft(run, tmp_path, how):
    out, base, flags = tmp_path / "out", BASE, []
    if how == "lora-path":
        flags, sources = ["--lora-path", LORA_PATH], ("adapter_config.json", "adapter_config.json")
    elif how == "flags":
        flags, sources = ["--lora-alpha", ALPHA, "--lora-r", R], ("--lora-r", "--lora-alpha")
    else:
        base, sources = _base_with_adapter_config(tmp_path), ("adapter_config.json", "adapter_config.json")
    r = ok(run("convert", CKPT, out, "--base", base, *flags), f"merge ({how})")
    r_val, r_src, a_val, a_src = lora_numbers(r.stderr)
    assert (r_val, a_val) == (R, ALPHA), r.stderr
    assert sources[0] in r_src and sources[1] in a_src, f"sources not named: r from {r_src!r}, alpha from {a_src!r}"
    assert not any(".lora_" in k or ".base_layer." in k or k.startswith(PEFT_PREFIX) for k in load_output(out))
    assert_logits(hf_logits(out, torch.float32), "merged_fp32", torch.float32, f"merge ({how})")


@pytest.mark.parametrize("content", ['{"r": 4, "lora_alpha": 8', '[4, 8]'], ids=["cut-json", "not-an-object"])
def test_malformed_adapter_config_is_refused_not_ignored(run, tmp_path, content):
    """Its lora_alpha decides the merge: a broken adapter_config.json must stop the run, never fall back to
    alpha = r silently (the page did: it ignored one it could not parse)."""
    base = _base_with_adapter_config(tmp_path)
    (base / "adapter_config.json").write_text(content)
    out = tmp_path / "out"
    r = run("convert", CKPT, out, "--base", base)
    failed_cleanly(r, out, "error[config]", str(base / "adapter_config.json"), what="malformed adapter_config.json")


def test_merge_default_alpha_is_r(run, tmp_path):
    """No flag and no adapter_config.json anywhere: alpha = r, the LoRA RLinf builds (lora_alpha=lora_rank)."""
    out = tmp_path / "out"
    r = ok(run("convert", CKPT, out, "--base", BASE), "merge with default alpha")
    r_val, _, a_val, _ = lora_numbers(r.stderr)
    assert (r_val, a_val) == (R, R), r.stderr
    assert_logits(hf_logits(out, torch.float32), "merged_alpha_eq_r_fp32", torch.float32, "merge alpha = r")


def test_merge_is_default_when_lora_keys_exist(run, tmp_path):
    """Without --lora the LoRA is merged, never written under PEFT names."""
    ok(run("convert", CKPT, tmp_path / "a", "--lora-alpha", ALPHA), "default")
    ok(run("convert", CKPT, tmp_path / "b", "--lora-alpha", ALPHA, "--lora", "merge"), "--lora merge")
    assert_same(load_output(tmp_path / "a"), load_output(tmp_path / "b"), "default vs --lora merge")


def test_merge_bf16_matches_peft(run, tmp_path):
    out = tmp_path / "out"
    ok(run("convert", CKPT_BF16, out, "--base", BASE, "--lora-path", LORA_PATH), "bf16 merge")
    assert {v.dtype for v in load_output(out).values()} == {torch.bfloat16}
    assert_logits(hf_logits(out, torch.bfloat16), "merged_bf16", torch.bfloat16, "bf16 merge")


@pytest.mark.parametrize("src,flags,out_dtype", [
    (CKPT, [], None), (CKPT_BF16, [], None), (CKPT, ["--dtype", "bf16"], torch.bfloat16),
    (CKPT_BF16, ["--dtype", "fp32"], torch.float32), (CKPT, ["--dtype", "fp16"], torch.float16),
], ids=["fp32", "bf16", "fp32-to-bf16", "bf16-to-fp32", "fp32-to-fp16"])
def test_merge_tensors_match_torch(run, tmp_path, src, flags, out_dtype):
    """Tensor by tensor against torch's W + s·B·A in f32 rounded once; names are exactly the base's weights."""
    out = tmp_path / "out"
    ok(run("convert", src, out, "--base", BASE, "--lora-path", LORA_PATH, *flags), f"merge {src.name} {flags}")
    got = load_output(out)
    assert {k: tuple(v.shape) for k, v in got.items()} == base_weight_shapes(BASE)
    assert_merged_close(got, torch_merge(load_pt(src), ALPHA, R, out_dtype), f"{src.name} {flags}")


def test_merge_fp32_matches_peft_state_dict(run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules=ADAPTER_CFG["target_modules"]))
    model.load_state_dict(load_pt(CKPT), strict=True)
    want = {k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "out"
    ok(run("convert", CKPT, out, "--lora-path", LORA_PATH), "merge")
    assert_merged_close(load_output(out), want, "vs peft merge_and_unload state dict")


# --- 1b. pt2hf (RLinf's YAML) -----------------------------------------------------------------------------

@pytest.mark.parametrize("ckpt,ref,dtype", [(CKPT, "merged_fp32", torch.float32), (CKPT_BF16, "merged_bf16", torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_pt2hf_rlinf_yaml_unchanged(run, tmp_path, ckpt, ref, dtype):
    """RLinf's fsdp_model_convertor.yaml with only its paths substituted. As in RLinf, lora_path's
    adapter_config.json (r=4, alpha=8) describes the LoRA: RLinf's get_model then loads
    PeftModel.from_pretrained(model, lora_path) and never looks at model.lora_rank (32, the template's value)."""
    out = tmp_path / "save"
    cfg = rlinf_yaml(tmp_path / "fsdp_model_convertor.yaml", ckpt, out, BASE, LORA_PATH)
    r = ok(run("pt2hf", "--config", cfg), "pt2hf with RLinf's YAML")
    assert "hydra/job_logging" in r.stderr, "the ignored Hydra override is not reported"
    assert "model/openvla_oft@model" in r.stderr, "the unresolvable defaults entry is not reported"
    assert {p.name for p in out.iterdir()} == package_files(BASE) | {"model.safetensors"}
    assert_logits(hf_logits(out, dtype), ref, dtype, f"pt2hf {ckpt.name}")


def test_pt2hf_lora_rank_without_lora_path(run, tmp_path):
    """lora_path: null -> r = model.lora_rank and alpha = r, as RLinf's get_model builds LoraConfig."""
    out = tmp_path / "save"
    cfg = rlinf_yaml(tmp_path / "c.yaml", CKPT, out, BASE, "null", {"lora_rank: 32": f"lora_rank: {R}"})
    r = ok(run("pt2hf", "--config", cfg), "pt2hf lora_path null")
    assert lora_numbers(r.stderr)[::2] == (R, R), r.stderr
    assert_logits(hf_logits(out, torch.float32), "merged_alpha_eq_r_fp32", torch.float32, "pt2hf alpha = r")


def test_pt2hf_command_line_overrides_file(run, tmp_path):
    cfg = rlinf_yaml(tmp_path / "c.yaml", CKPT, tmp_path / "save", BASE, "null", {"lora_rank: 32": f"lora_rank: {R}"})
    ok(run("pt2hf", "--config", cfg, "--lora-alpha", ALPHA), "pt2hf --lora-alpha")
    assert_logits(hf_logits(tmp_path / "save", torch.float32), "merged_fp32", torch.float32, "pt2hf --lora-alpha")
    other = tmp_path / "elsewhere"
    cfg2 = rlinf_yaml(tmp_path / "c2.yaml", CKPT, other, BASE, LORA_PATH, {"lora_rank: 32": f"lora_rank: {R}"})
    ok(run("pt2hf", "--config", cfg2, "--lora", "adapter"), "pt2hf --lora adapter over merge_lora_weighs: True")
    assert (other / "lora_adapter" / "adapter_model.safetensors").exists()
    assert not (other / "model.safetensors").exists()


def test_pt2hf_defaults_merged_from_beside(run, tmp_path):
    """`defaults: - model/openvla_oft@model` resolves to model/openvla_oft.yaml beside the config and lands
    under model:, with the main file winning (Hydra's _self_ last): use_film/use_proprio come from the
    defaults file; is_lora (False there) and model_path (a /path/to placeholder there) from the main file."""
    (tmp_path / "model").mkdir()
    shutil.copy(CONFIGS / "model" / "openvla_oft.yaml", tmp_path / "model" / "openvla_oft.yaml")
    out = tmp_path / "save"
    cfg = rlinf_yaml(tmp_path / "fsdp_model_convertor.yaml", TOY / "full_weights.pt", out, TOY / "base", "null",
                     {"lora_rank: 32": "lora_rank: 8"})
    r = ok(run("pt2hf", "--config", cfg), "pt2hf with defaults beside")
    assert "hydra/job_logging" in r.stderr
    assert "ignored 'model/openvla_oft@model'" not in r.stderr, r.stderr
    assert_openvla_output(out, film=True, proprio=True)


# --- 2. adapter export -----------------------------------------------------------------------------------

def test_adapter_export_fp32(run, tmp_path):
    out = tmp_path / "out"
    r = ok(run("convert", CKPT, out, "--base", BASE, "--lora", "adapter", "--lora-path", LORA_PATH), "adapter export")
    assert lora_numbers(r.stderr)[::2] == (R, ALPHA)
    adapter = out / "lora_adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # peft's own save_pretrained of the same adapter, bit for bit (names base_model.model.<m>.lora_A.weight).
    assert_same(load_file(adapter / "adapter_model.safetensors"), load_file(LORA_PATH / "adapter_model.safetensors"), "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", R, ALPHA)
    assert sorted(cfg["target_modules"]) == sorted(ADAPTER_CFG["target_modules"])
    # The base package next to it (as RLinf's copy_model_config_and_code), no weights: the base is model_path.
    assert {p.name for p in out.iterdir()} == package_files(BASE) | {"lora_adapter"}
    for name in package_files(BASE):
        assert (out / name).read_bytes() == (BASE / name).read_bytes(), name
    diff = (peft_logits(BASE, adapter, torch.float32) - REF["adapter_fp32"]).abs().max().item()
    assert diff <= 1e-5, f"PeftModel.from_pretrained(base, lora_adapter) logits differ by {diff:.3g}"


def test_adapter_export_alpha_from_flag(run, tmp_path):
    """No adapter_config.json to copy: ckptconv writes one itself, and peft must accept it."""
    out = tmp_path / "out"
    ok(run("convert", CKPT, out, "--lora", "adapter", "--lora-alpha", ALPHA), "adapter export --lora-alpha")
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", R, ALPHA)
    assert_logits(peft_logits(BASE, out / "lora_adapter", torch.float32), "adapter_fp32", torch.float32, "adapter (flag)")


def test_adapter_export_refuses_shards(run, tmp_path):
    """PEFT loads one adapter_model.safetensors: a shard limit the adapter exceeds is refused, with nothing written."""
    out = tmp_path / "out"
    r = run("convert", CKPT, out, "--lora", "adapter", "--lora-alpha", ALPHA, "--max-shard-size", "1KB")
    failed_cleanly(r, out, "error[unsupported]", "sharded LoRA adapter", "--max-shard-size", what="sharded adapter")


def test_adapter_export_bf16(run, tmp_path):
    out = tmp_path / "out"
    ok(run("convert", CKPT_BF16, out, "--lora", "adapter", "--lora-path", LORA_PATH), "bf16 adapter export")
    sd = load_pt(CKPT_BF16)
    want = {k.replace(".default.weight", ".weight"): v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
    assert_same(load_file(out / "lora_adapter" / "adapter_model.safetensors"), want, "bf16 adapter")
    assert_logits(peft_logits(BASE, out / "lora_adapter", torch.bfloat16), "adapter_bf16", torch.bfloat16, "bf16 adapter")


def test_pt2hf_adapter(run, tmp_path):
    """merge_lora_weighs: False -> save_path/lora_adapter, as RLinf's model.save_pretrained(save_path/lora_adapter)."""
    out = tmp_path / "save"
    cfg = rlinf_yaml(tmp_path / "c.yaml", CKPT, out, BASE, LORA_PATH, {"merge_lora_weighs: True": "merge_lora_weighs: False"})
    ok(run("pt2hf", "--config", cfg), "pt2hf adapter")
    assert not (out / "model.safetensors").exists()
    assert_logits(peft_logits(BASE, out / "lora_adapter", torch.float32), "adapter_fp32", torch.float32, "pt2hf adapter")


# --- 3. packaging ----------------------------------------------------------------------------------------

def test_package_loads_and_is_the_base_package(run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    ok(run("convert", CKPT, out, "--base", BASE, "--lora-path", LORA_PATH), "merge with --base")
    assert base_weight_files(BASE) >= {INDEX}, "fixture: the base should be sharded with an index"
    # Exactly the base's package files (byte-identical) plus ckptconv's own weights: no base shard, no index.
    assert {p.name for p in out.iterdir()} == package_files(BASE) | {"model.safetensors"}
    for name in package_files(BASE):
        assert (out / name).read_bytes() == (BASE / name).read_bytes(), f"{name} is not a byte copy"
    got, want = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(BASE)
    text = "put the bowl in the drawer"
    assert got(text)["input_ids"] == want(text)["input_ids"] and len(got(text)["input_ids"]) > 1
    chat = [{"role": "user", "content": text}]
    assert got.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert_logits(hf_logits(out, torch.float32), "merged_fp32", torch.float32, "packaged merge")


def _mismatched_base(tmp_path, kind):
    """A base folder built by transformers from BASE's config with one thing changed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(BASE)
    if kind == "hidden":
        cfg.hidden_size = 48  # every layer's shapes change
    elif kind == "fewer_layers":
        cfg.num_hidden_layers, cfg.layer_types = 1, cfg.layer_types[:1]  # the checkpoint has unexpected layer 1
    elif kind == "more_layers":
        cfg.num_hidden_layers, cfg.layer_types = 3, cfg.layer_types + cfg.layer_types[:1]  # layer 2 missing
    elif kind == "hidden_bin":
        cfg.hidden_size = 48
    base = tmp_path / f"base_{kind}"
    model = AutoModelForCausalLM.from_config(cfg)
    if kind.endswith("_bin"):
        cfg.save_pretrained(base)
        torch.save(model.state_dict(), base / "pytorch_model.bin")
    else:
        model.save_pretrained(base)
    return base


MISMATCH_NAMES = {"hidden": "model.layers.0.", "fewer_layers": "model.layers.1.", "more_layers": "model.layers.2.",
                  "hidden_bin": "model.layers.0."}


@pytest.mark.parametrize("kind", sorted(MISMATCH_NAMES))
def test_mismatched_base_refused_then_allowed(run, tmp_path, kind):
    base = _mismatched_base(tmp_path, kind)
    out = tmp_path / "out"
    r = run("convert", CKPT, out, "--base", base, "--lora-path", LORA_PATH)
    failed_cleanly(r, out, MISMATCH_NAMES[kind], what=f"base mismatch ({kind})")
    assert "--allow-mismatch" in r.stderr, "the refusal does not say how to override it"
    ok(run("convert", CKPT, out, "--base", base, "--lora-path", LORA_PATH, "--allow-mismatch"), "--allow-mismatch")
    ok(run("convert", CKPT, tmp_path / "plain", "--lora-path", LORA_PATH), "no base")
    assert_same(load_output(out), load_output(tmp_path / "plain"), "--allow-mismatch output vs no base")


def test_matching_pytorch_model_bin_base(run, tmp_path):
    """The name/shape check also reads a base that only has pytorch_model.bin."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base_bin"
    shutil.copytree(BASE, base, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    torch.save(AutoModelForCausalLM.from_pretrained(BASE).state_dict(), base / "pytorch_model.bin")
    out = tmp_path / "out"
    ok(run("convert", CKPT, out, "--base", base, "--lora-path", LORA_PATH), "pytorch_model.bin base")
    assert "pytorch_model.bin" not in {p.name for p in out.iterdir()}


def test_tied_lm_head_dropped(run, tmp_path):
    """Base config ties embeddings and the checkpoint's lm_head equals the embedding: written once, as
    save_pretrained does, and transformers re-ties it."""
    assert json.loads((TIED / "config.json").read_text())["tie_word_embeddings"] is True
    out = tmp_path / "out"
    ok(run("convert", CKPT_TIED, out, "--base", TIED, "--lora-path", LORA_PATH), "tied merge")
    got = load_output(out)
    assert "lm_head.weight" not in got
    assert {k: tuple(v.shape) for k, v in got.items()} == base_weight_shapes(TIED)
    assert_logits(hf_logits(out, torch.float32), "tied_merged_fp32", torch.float32, "tied merge")


def test_tied_base_differing_lm_head_not_silently_dropped(run, tmp_path):
    """A tied base but an lm_head that differs from the embedding: dropping it would lose trained weights.
    Either refuse, or keep it exactly."""
    sd = load_pt(CKPT_TIED)
    head = sd["base_model.model.lm_head.weight"].clone()
    head[0, 0] += 1.0
    sd["base_model.model.lm_head.weight"] = head
    src = tmp_path / "untied_head.pt"
    torch.save(sd, src)
    out = tmp_path / "out"
    r = run("convert", src, out, "--base", TIED, "--lora-path", LORA_PATH)
    if r.returncode == 0:
        got = load_output(out)
        assert "lm_head.weight" in got and tensor_bytes(got["lm_head.weight"]) == tensor_bytes(head), \
            "differing lm_head dropped"
    else:
        failed_cleanly(r, out, "lm_head", what="tied base, differing lm_head")


def test_untied_base_keeps_equal_lm_head(run, tmp_path):
    """Equal values are not enough to drop lm_head: the base config must tie."""
    sd = load_pt(CKPT)
    sd["base_model.model.lm_head.weight"] = sd["base_model.model.model.embed_tokens.weight"].clone()
    src = tmp_path / "equal_head.pt"
    torch.save(sd, src)
    out = tmp_path / "out"
    ok(run("convert", src, out, "--base", BASE, "--lora-path", LORA_PATH), "untied base, equal lm_head")
    assert "lm_head.weight" in load_output(out)


# --- 4. bad inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_rank_mismatch_refused(run, tmp_path, mode):
    out = tmp_path / "out"
    r = run("convert", L / "bad" / "rank_mismatch.pt", out, "--base", BASE, "--lora", mode, "--lora-path", LORA_PATH)
    # The error names the checkpoint (issue #16: LoRA errors named no file).
    failed_cleanly(r, out, f"{L / 'bad' / 'rank_mismatch.pt'}: ", "model.layers.1.mlp.up_proj", "rank",
                   what=f"rank mismatch ({mode})")


def test_lora_flags_without_lora_tensors_name_the_checkpoint(run, tmp_path):
    """--lora on a checkpoint with no LoRA tensors, and --lora-r against its real rank: errors about the
    checkpoint's tensors, so they name it."""
    plain = FIXTURES / "pt" / "odd_names.pt"
    out = tmp_path / "out"
    failed_cleanly(run("convert", plain, out, "--lora", "merge"), out, f"{plain}: ", "no lora tensors", what="--lora")
    failed_cleanly(run("convert", CKPT, out, "--base", BASE, "--lora", "adapter", "--lora-r", "3"), out, f"{CKPT}: ",
                   "--lora-r says r = 3", what="--lora-r")


# The checkpoint is fine in these cases: a message calling it "not a torch checkpoint" sends the user to the
# wrong file.
NOT_THE_CHECKPOINT = ("not a torch checkpoint",)


def test_missing_base_folder(run, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "no_such_base"
    r = run("convert", CKPT, out, "--base", missing)
    failed_cleanly(r, out, str(missing), what="missing --base", wrong=NOT_THE_CHECKPOINT)


def test_pt2hf_missing_model_path(run, tmp_path):
    out, missing = tmp_path / "save", tmp_path / "no_such_base"
    cfg = rlinf_yaml(tmp_path / "c.yaml", CKPT, out, missing, LORA_PATH)
    failed_cleanly(run("pt2hf", "--config", cfg), out, str(missing), what="pt2hf missing model_path", wrong=NOT_THE_CHECKPOINT)


def test_pt2hf_yaml_missing_ckpt_path(run, tmp_path):
    out = tmp_path / "save"
    cfg = write_yaml(tmp_path / "c.yaml", CONFIGS / "missing_ckpt_path.yaml", **{
        PLACEHOLDER["save"]: out, PLACEHOLDER["model"]: BASE, PLACEHOLDER["lora"]: LORA_PATH})
    failed_cleanly(run("pt2hf", "--config", cfg), out, "ckpt_path", what="YAML without ckpt_path", wrong=NOT_THE_CHECKPOINT)


def test_pt2hf_lora_rank_disagrees_with_checkpoint(run, tmp_path):
    """lora_path: null and the template's lora_rank: 32 against a rank-4 checkpoint: RLinf's load_state_dict
    fails on the shapes; ckptconv must refuse too rather than scale by alpha/r = 32/32 with the wrong r."""
    out = tmp_path / "save"
    cfg = rlinf_yaml(tmp_path / "c.yaml", CKPT, out, BASE, "null")
    failed_cleanly(run("pt2hf", "--config", cfg), out, "rank", "32", what="lora_rank 32 vs rank-4 tensors")


# --- 5. openvla_oft save helper --------------------------------------------------------------------------

def assert_openvla_output(out, film, proprio):
    """The merged model equals peft's merge_and_unload state dict; the helper files are torch.save dicts of
    the merged tensors under vision_backbone. / proprio_projector. with that prefix stripped."""
    got = load_output(out)
    assert_merged_close(got, load_file(TOY / "merged_reference.safetensors"), "openvla toy vs peft merge")
    base = TOY / "base"
    for name in package_files(base):  # config, remote code, preprocessor config, dataset_statistics.json
        assert (out / name).read_bytes() == (base / name).read_bytes(), f"{name} not copied"
    for prefix, want_file in (("vision_backbone.", film), ("proprio_projector.", proprio)):
        path = out / f"{prefix[:-1]}--0_checkpoint.pt"
        assert path.exists() == want_file, f"{path.name} exists={path.exists()}, expected {want_file}"
        if want_file:
            side = torch.load(path, weights_only=True)
            want = {k[len(prefix):]: v for k, v in got.items() if k.startswith(prefix)}
            assert want and any(".lora" not in k for k in want)
            assert_same(side, want, path.name)


@pytest.mark.parametrize("film,proprio", [(True, True), (True, False), (False, True), (False, False)])
def test_openvla_oft_helper_files(run, tmp_path, film, proprio):
    out = tmp_path / "out"
    flags = ["--model-type", "openvla_oft"] + ["--use-film"] * film + ["--use-proprio"] * proprio
    ok(run("convert", TOY / "full_weights.pt", out, "--base", TOY / "base", *flags), f"openvla {flags}")
    assert_openvla_output(out, film, proprio)
