"""Multi-rank DeepSpeed ZeRO 1/2/3 checkpoints convert to DeepSpeed's own consolidation (issue 18).

Owns: tests/e2e/test_deepspeed_zero.py. Inputs are made once per session by tests/fixtures/make_zero_fixtures.py
(real DeepSpeed training on CPU, 2 and 3 ranks, padded partitions, fp32 and bf16, tied embeddings, frozen
parameters, persistent buffers, one and two param groups; about 1.5 min; nothing committed; env
CKPTCONV_ZERO_FIXTURES=DIR uses a folder the script already wrote instead). Expected tensors are exactly
DeepSpeed's deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint (the fixture's
expected.safetensors): fp32 master weights, float buffers as fp32, int64 buffers as they are, and frozen
parameters in the dtype the engine trained them in (bf16 in bf16 runs; DeepSpeed's zero_to_fp32.py command line
would up-cast those to fp32, its default dtype). Logits come from the DeepSpeed engine's own module after training.

One deliberate difference from zero_to_fp32: ZeRO-1 does not record frozen parameters (frozen_param_shapes and
frozen_param_fragments are None below stage 2, deepspeed/runtime/engine.py _save_checkpoint), so zero_to_fp32 leaves
them out and the model is incomplete; here they are expected from the module in mp_rank_00_model_states.pt
(test_zero1_frozen_params_come_from_the_model_states).

Tolerance for logits (transformers 5 on ckptconv's output vs the engine's module): fp32 runs 1e-5 (observed 0);
bf16 runs 2e-2, about 5 bf16 ulps at |logit| < 1: the weights are bit-identical to the engine's bf16 module, but
ZeRO-3's forward computes its linears in another order (observed 4.6e-3 for zero3_bf16_w3, 0 elsewhere).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, assert_same, load_output

CASES = ["zero1_fp32_w2", "zero1_bf16_w3", "zero2_bf16_w3", "zero3_fp32_w2", "zero3_bf16_w3"]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
WASM = Path(os.environ.get("CKPTCONV_WASM", REPO / "target" / "wasi" / "ckptconv.wasm"))
if not WASM.is_absolute():
    WASM = REPO / WASM


@pytest.fixture(scope="session")
def zero_root(tmp_path_factory):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.fail("deepspeed is not installed: it is in tests/requirements.txt, run scripts/setup.sh")
    if os.environ.get("CKPTCONV_ZERO_FIXTURES"):  # a folder the script already wrote (saves ~1.5 min per run)
        return Path(os.environ["CKPTCONV_ZERO_FIXTURES"])
    out = tmp_path_factory.mktemp("zero")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_zero_fixtures.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"make_zero_fixtures.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out


# --- helpers -------------------------------------------------------------------------------------------------

def meta(root, case):
    return json.loads((root / case / "meta.json").read_text())


def convert_ok(run, src, out, *flags):
    r = run("convert", src, out, "--quiet", *flags)
    assert r.returncode == 0, f"convert {src}: exit {r.returncode}\n{r.stderr}"
    assert "unsafe-global" not in r.stderr, r.stderr
    return r


def model_states(root, case):
    m = meta(root, case)
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if m["stage"] == 3 else "mp_rank_00_model_states.pt"
    return torch.load(root / case / "ckpt" / m["tag"] / name, map_location="cpu", weights_only=False)


def zero1_frozen(root, case):
    """ZeRO-1's frozen parameters, which only the module in mp_rank_00_model_states.pt holds."""
    m = meta(root, case)
    if m["stage"] != 1 or not m["frozen"]:
        return {}
    module = model_states(root, case)["module"]
    return {k: module[k] for k in m["frozen"]}


def want(root, case, dtype=None):
    """DeepSpeed's consolidation as it returns it, or with floating tensors cast to dtype (integers keep theirs)."""
    exp = load_file(root / case / "expected.safetensors")
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in exp.items()}


def assert_matches(got, root, case, dtype=None, what=""):
    """Every tensor of DeepSpeed's consolidation, bit for bit; ZeRO-1 frozen parameters may be added (and are
    checked by their own test)."""
    w = want(root, case, dtype)
    extra = set(got) - set(w)
    assert extra <= set(zero1_frozen(root, case)), f"{what}: names not in zero_to_fp32's output: {sorted(extra)}"
    assert_same({k: got[k] for k in w if k in got}, w, what)


def assert_nothing_finished(out):
    """No output that looks finished (and no leftover partial file) after a refusal."""
    if not out.exists():
        return
    files = [p for p in out.rglob("*") if p.is_file()]
    bad = [p for p in files if p.name in ("model.safetensors", "config.json") or p.name.endswith(".index.json")
           or p.suffix == ".safetensors" or "ckptconv-partial" in p.name]
    assert not bad, f"{out} holds {[str(p.relative_to(out)) for p in bad]} after a refusal"


def refused(run, src, out):
    r = run("convert", src, out)
    assert r.returncode == 1, f"convert {src}: exit {r.returncode} (expected 1)\nstdout {r.stdout}\nstderr {r.stderr}"
    assert "error[" in r.stderr, r.stderr
    assert_nothing_finished(out)
    return r.stderr


def names_rank_1(err):
    """stderr names rank 1 or its file (zero_pp_rank_1_...): 'rank 1', 'rank_1', not 'rank 10'."""
    return re.search(r"rank[ _]1(?!\d)", err) is not None


def copy_ckpt(root, case, dst):
    shutil.copytree(root / case / "ckpt", dst)
    return dst


def optim_file(root, case, rank):
    m = meta(root, case)
    prefix = "bf16_" if m["dtype"] == "bfloat16" else ""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@torch.no_grad()
def hf_load(folder, dtype, allowed_unexpected=()):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys")}
    assert not bad, f"{folder}: transformers did not load cleanly: {bad}"
    assert set(info.get("unexpected_keys") or ()) == set(allowed_unexpected), info
    return model.eval()


# --- the fixture itself ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_fixture_has_padding_and_layout(zero_root, case):
    """The inputs are what the cases claim: WORLD optimizer files, padding present (ZeRO-1/2: group end of the last
    rank, stripped on save and recorded in group_paddings; ZeRO-3: per parameter), shared_params when tied."""
    m = meta(zero_root, case)
    step = zero_root / case / "ckpt" / m["tag"]
    assert (zero_root / case / "ckpt" / "latest").read_text().strip() == m["tag"]
    names = sorted(p.name for p in step.iterdir())
    optim = [optim_file(zero_root, case, r) for r in range(m["world_size"])]
    assert set(optim) <= set(names), names
    ms = model_states(zero_root, case)
    assert (ms["shared_params"] == {"lm_head.weight": "model.embed_tokens.weight"}) == m["tied"]
    shapes = [s for g in ms["param_shapes"] for s in g.values()]
    assert len(ms["param_shapes"]) == m["param_groups"]
    osd = torch.load(step / optim[-1], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    if m["stage"] == 3:
        assert any(s.numel() % m["world_size"] for s in shapes), "no ZeRO-3 parameter is padded"
        assert sorted(ms["frozen_param_shapes"]) == sorted(m["frozen"])
    else:
        assert any(osd["group_paddings"]), "no ZeRO-1/2 group is padded"


# --- conversion ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src", ["folder", "step"])
@pytest.mark.parametrize("case", CASES)
def test_convert_matches_zero_to_fp32(run, tmp_path, zero_root, case, src):
    """`convert CKPT OUT` (the folder holding `latest`) and `convert CKPT/global_stepN OUT`: the tensors of
    DeepSpeed's get_fp32_state_dict_from_zero_checkpoint: names, dtypes and bytes."""
    ckpt = zero_root / case / "ckpt"
    inp = ckpt if src == "folder" else ckpt / meta(zero_root, case)["tag"]
    out = tmp_path / "out"
    convert_ok(run, inp, out)
    assert_matches(load_output(out), zero_root, case, what=f"{case} {src}")


@pytest.mark.parametrize("case", CASES)
def test_convert_bf16(run, tmp_path, zero_root, case):
    """--dtype bf16: zero_to_fp32's tensors cast by torch .to(bfloat16) (round to nearest even); integer buffers
    keep their dtype."""
    out = tmp_path / "out"
    convert_ok(run, zero_root / case / "ckpt", out, "--dtype", "bf16")
    assert_matches(load_output(out), zero_root, case, torch.bfloat16, f"{case} bf16")


def test_zero1_frozen_params_come_from_the_model_states(run, tmp_path, zero_root):
    """ZeRO-1 with a frozen parameter: DeepSpeed records no frozen_param_* below stage 2 and zero_to_fp32 drops it;
    the module in mp_rank_00_model_states.pt holds it (bf16 here, never updated; kept in bf16 as ZeRO-2/3 frozen
    parameters are). The output must have it, or the model is incomplete."""
    case = "zero1_bf16_w3"
    frozen = zero1_frozen(zero_root, case)
    assert frozen and not set(frozen) & set(want(zero_root, case)), "the fixture no longer shows the gap"
    out = tmp_path / "out"
    convert_ok(run, zero_root / case / "ckpt", out)
    got = load_output(out)
    missing = sorted(set(frozen) - set(got))
    assert not missing, f"ZeRO-1 frozen parameters missing (zero_to_fp32 drops them too): {missing}"
    assert_same({k: got[k] for k in frozen}, frozen, f"{case} frozen")


@pytest.mark.parametrize("case", CASES)
def test_base_loads_in_transformers(run, tmp_path, zero_root, case):
    """--base CASE/hf: config.json comes along, the output loads in transformers 5 with no missing or mismatched
    key (the model's persistent extra buffers are the only unexpected keys), tied lm_head.weight is dropped as
    save_pretrained drops it, and the logits are the engine's within the training dtype's tolerance."""
    m = meta(zero_root, case)
    root = zero_root / case
    out = tmp_path / "out"
    convert_ok(run, root / "ckpt", out, "--base", root / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == m["tied"] and cfg.get("dtype", "float32") == "float32", cfg
    got = load_output(out)
    w = want(zero_root, case)
    w.update(zero1_frozen(zero_root, case))
    if m["tied"]:
        assert "lm_head.weight" not in got, "tied lm_head.weight kept (save_pretrained drops it)"
        w.pop("lm_head.weight")
    assert_same(got, w, f"{case} --base")

    dtype = getattr(torch, m["dtype"])
    model = hf_load(out, dtype, m["buffers"])
    # the names transformers itself writes for this model are the output's (buffers aside)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert sorted(load_file(saved / "model.safetensors")) == sorted(set(got) - set(m["buffers"]))
    ids = torch.load(root / "input_ids.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    diff = (logits - torch.load(root / "reference_logits.pt", weights_only=True)).abs().max().item()
    assert diff <= TOL[m["dtype"]], f"{case}: max |HF(ckptconv) - DeepSpeed engine| = {diff} ({m['dtype']})"


def test_base_bf16_cast(run, tmp_path, zero_root):
    """--base with --dtype bf16: config.json says bfloat16 and transformers gives the engine's bf16 logits."""
    case = "zero3_bf16_w3"
    root = zero_root / case
    out = tmp_path / "out"
    convert_ok(run, root / "ckpt", out, "--base", root / "hf", "--dtype", "bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16", cfg
    got = load_output(out)
    assert all(v.dtype == torch.bfloat16 for k, v in got.items() if k != "model.ckpt_count"), "not all bf16"
    model = hf_load(out, torch.bfloat16, meta(zero_root, case)["buffers"])
    with torch.no_grad():
        logits = model(input_ids=torch.load(root / "input_ids.pt", weights_only=True)).logits.float()
    diff = (logits - torch.load(root / "reference_logits.pt", weights_only=True)).abs().max().item()
    assert diff <= TOL["bfloat16"], diff


# --- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["zero2_bf16_w3", "zero3_fp32_w2"])
def test_missing_rank_optim_states(run, tmp_path, zero_root, case):
    ckpt = copy_ckpt(zero_root, case, tmp_path / "ckpt")
    name = optim_file(zero_root, case, 1)
    (ckpt / meta(zero_root, case)["tag"] / name).unlink()
    err = refused(run, ckpt, tmp_path / "out")
    assert names_rank_1(err), f"the missing rank (or its file) is not named:\n{err}"


def test_missing_rank_model_states_zero3(run, tmp_path, zero_root):
    """ZeRO-3 keeps each rank's fragment of a frozen parameter in that rank's model states file."""
    case = "zero3_fp32_w2"
    ckpt = copy_ckpt(zero_root, case, tmp_path / "ckpt")
    (ckpt / meta(zero_root, case)["tag"] / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    err = refused(run, ckpt, tmp_path / "out")
    assert names_rank_1(err), f"the missing rank (or its file) is not named:\n{err}"


@pytest.mark.parametrize("case", ["zero1_fp32_w2", "zero3_bf16_w3"])
def test_truncated_optim_states(run, tmp_path, zero_root, case):
    ckpt = copy_ckpt(zero_root, case, tmp_path / "ckpt")
    name = optim_file(zero_root, case, 1)
    path = ckpt / meta(zero_root, case)["tag"] / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = refused(run, ckpt, tmp_path / "out")
    assert name in err, f"the truncated file is not named:\n{err}"


def test_latest_names_missing_step(run, tmp_path, zero_root):
    ckpt = copy_ckpt(zero_root, "zero3_fp32_w2", tmp_path / "ckpt")
    (ckpt / "latest").write_text("global_step9")
    err = refused(run, ckpt, tmp_path / "out")
    assert "global_step9" in err, f"the missing step folder is not named:\n{err}"


# --- WASI ------------------------------------------------------------------------------------------------------

def test_wasi_zero3_same_bytes(run, tmp_path, zero_root):
    """The WASI module converts a ZeRO-3 folder (3 ranks, bf16, two param groups) to the native bytes."""
    if not WASM.is_file():
        pytest.skip(f"WASI module not built at {WASM} (bash wasi/build.sh)")
    sys.path.insert(0, str(REPO / "wasi"))
    from runner import runner_prefix  # wasi/runner.py: wasmtime CLI, or wasi/run.py on PyPI wasmtime

    ckpt = zero_root / "zero3_bf16_w3" / "ckpt"
    native, wasi = tmp_path / "native", tmp_path / "wasi"
    wasi.mkdir()
    convert_ok(run, ckpt, native / "hf")
    argv = runner_prefix() + ["--dir", f"{ckpt}::/in", "--dir", f"{wasi}::/out", str(WASM),
                              "convert", "/in", "/out/hf", "--quiet"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    native_bin = Path(os.environ.get("CKPTCONV", REPO / "target" / "release" / "ckptconv"))
    stale = WASM.stat().st_mtime < (REPO / native_bin).stat().st_mtime - 60
    assert r.returncode == 0, (f"wasi convert failed ({r.returncode}):\n{r.stderr[-3000:]}"
                               + ("\n(the .wasm is older than the native binary: rebuild it, bash wasi/build.sh)"
                                  if stale else ""))
    a = {p.relative_to(native).as_posix(): p.read_bytes() for p in sorted(native.rglob("*")) if p.is_file()}
    b = {p.relative_to(wasi).as_posix(): p.read_bytes() for p in sorted(wasi.rglob("*")) if p.is_file()}
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for k in a:
        assert a[k] == b[k], f"{k} differs between native and WASI"
