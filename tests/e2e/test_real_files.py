"""Files written by DeepSpeed and transformers convert and inspect without flags (issue 16, must-show 2).

Owns: tests/e2e/test_real_files.py. Inputs are made for the session by the real libraries (nothing committed):
tests/fixtures/make_deepspeed_fixtures.py (engine.save_checkpoint on CPU, ZeRO 0-3) and
tests/fixtures/make_transformers_fixtures.py, run once with the venv's transformers 5 and once with transformers 4
from .venv/transformers4 (CKPTCONV_TRANSFORMERS4 overrides; scripts/setup.sh installs it), because only 4.x writes
pytorch_model.bin. Expected tensors come from torch.load(weights_only=False) of the same files and from DeepSpeed's
own zero_to_fp32; logits from the writing library's model. These pass with the pickle denylist and must keep
passing with the allowlist: these files call DeepSpeed's, transformers', accelerate's and numpy's classes
(see tests/security/globals_inventory.py).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, REPO, assert_same, expected_tensors, load_output

DS_CASES = ["zero0_fp32", "zero1_bf16", "zero2_fp32", "zero3_fp32"]
TF4 = Path(os.environ.get("CKPTCONV_TRANSFORMERS4", REPO / ".venv" / "transformers4"))


def generate(script, out, env=None, timeout=900):
    r = subprocess.run([sys.executable, str(FIXTURES / script), "--out", str(out)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{script} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="session")
def ds_root(tmp_path_factory):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.fail("deepspeed is not installed: it is in tests/requirements.txt, run scripts/setup.sh")
    out = tmp_path_factory.mktemp("deepspeed")
    generate("make_deepspeed_fixtures.py", out)
    return out


@pytest.fixture(scope="session")
def tf_root(tmp_path_factory):
    """OUT/tf5 (the venv's transformers) and OUT/tf4 (transformers 4.57 from TF4)."""
    if not (TF4 / "transformers").is_dir():
        pytest.fail(f"transformers 4 not found at {TF4}: run scripts/setup.sh (or set CKPTCONV_TRANSFORMERS4)")
    out = tmp_path_factory.mktemp("transformers")
    generate("make_transformers_fixtures.py", out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TF4), os.environ.get("PYTHONPATH")])))
    generate("make_transformers_fixtures.py", out, env=env)
    assert (out / "tf4" / "model" / "pytorch_model.bin").is_file(), "the transformers 4 run wrote no pytorch_model.bin"
    return out


def full_load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def convert_ok(run, src, out, *flags):
    r = run("convert", src, out, "--quiet", *flags)
    assert r.returncode == 0, f"convert {src}: exit {r.returncode}\n{r.stderr}"
    assert "unsafe-global" not in r.stderr, r.stderr
    return r


def inspect_ok(run, path):
    """inspect exits 0; a file that holds no tensor at all (a scheduler's state, TrainingArguments) exits 1 with
    error[no-tensors] today, which is not a refusal: either way no global may be refused."""
    r = run("inspect", path)
    assert "unsafe-global" not in r.stderr, f"{path}: {r.stderr}"
    if r.returncode != 0:
        assert r.returncode == 1 and "error[no-tensors]" in r.stderr, f"inspect {path}: exit {r.returncode}\n{r.stderr}"
        assert not expected_tensors(full_load(path)), f"{path} holds tensors but inspect says it has none"
    return r


@torch.no_grad()
def hf_logits(folder, ids, dtype=torch.float32):
    """transformers' (the venv's) logits of a folder; loading must use every tensor and miss none."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{folder}: transformers did not load cleanly: {bad}"
    return model.eval()(input_ids=ids).logits.float()


def ds_files(case_dir):
    return sorted((case_dir / "ckpt").rglob("*.pt"))


# --- DeepSpeed ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_every_file_inspects(run, ds_root, case):
    files = ds_files(ds_root / case)
    names = {f.name for f in files}
    assert any(n.endswith("model_states.pt") for n in names), names
    if case != "zero0_fp32":
        assert any(n.endswith("optim_states.pt") for n in names), names
    for f in files:
        r = inspect_ok(run, f)
        assert r.returncode == 0, f"inspect {f}: {r.stderr}"


@pytest.mark.parametrize("case", ["zero0_fp32", "zero1_bf16", "zero2_fp32"])
def test_deepspeed_model_states_convert(run, tmp_path, ds_root, case):
    """mp_rank_00_model_states.pt: the planner takes 'module' (its first automatic prefix present here), strips it,
    skips the optimizer, and writes torch's tensors bit for bit."""
    src = ds_root / case / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt"
    sd = full_load(src)
    assert "module" in sd and "model" not in sd and "state_dict" not in sd, sorted(sd)
    out = tmp_path / "out"
    convert_ok(run, src, out, "--force")
    got = load_output(out)
    assert_same(got, expected_tensors(sd), f"{case} model states")
    assert sorted(got) == sorted(sd["module"]), "names are not the module's state dict keys"
    if case == "zero0_fp32":
        # client optimizer and scheduler states sit in this file at stage 0; their tensors are skipped
        assert sd["optimizer"]["state"] and sd["lr_scheduler"], "the fixture lost its optimizer state"


@pytest.mark.parametrize("case", ["zero1_bf16", "zero2_fp32"])
def test_deepspeed_model_states_match_zero_to_fp32(run, tmp_path, ds_root, case):
    """DeepSpeed's own recovery (zero_to_fp32, from the ZeRO optimizer partitions) agrees with what we convert from
    the model states: equal in fp32, and the bf16 module is the fp32 master rounded to bf16."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = ds_root / case / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt"
    out = tmp_path / "out"
    convert_ok(run, src, out, "--force")
    got = load_output(out)
    master = get_fp32_state_dict_from_zero_checkpoint(str(ds_root / case / "ckpt"))
    assert sorted(master) == sorted(got)
    want = {k: v.to(got[k].dtype) for k, v in master.items()}
    assert_same(got, want, f"{case} vs zero_to_fp32")


@pytest.mark.parametrize("case", ["zero0_fp32", "zero1_bf16", "zero2_fp32"])
def test_deepspeed_transformers_reproduces_logits(run, tmp_path, ds_root, case):
    root = ds_root / case
    out = tmp_path / "out"
    convert_ok(run, root / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt", out, "--force")
    shutil.copy(root / "config.json", out / "config.json")
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    got = hf_logits(out, torch.load(root / "input_ids.pt", weights_only=True), dtype)
    diff = (got - torch.load(root / "reference_logits.pt", weights_only=True)).abs().max().item()
    assert diff <= 1e-5, f"{case}: max |HF(ckptconv) - DeepSpeed engine| = {diff}"


def test_deepspeed_zero3_model_states_are_placeholders(run, ds_root):
    """ZeRO-3 keeps the weights in the optimizer partitions; the model states' 'module' holds empty placeholders,
    and inspect shows them as torch reads them (0 bytes each). Recorded, not a conversion target."""
    src = ds_root / "zero3_fp32" / "ckpt" / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    module = full_load(src)["module"]
    assert module and all(t.numel() == 0 for t in module.values())
    r = run("inspect", src)
    assert r.returncode == 0, r.stderr
    assert f"tensors: {len(module)} (0 B" in r.stdout, r.stdout


# --- transformers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["model/pytorch_model.bin", "trainer/checkpoint-1/pytorch_model.bin",
                                 "trainer/checkpoint-1/optimizer.pt", "trainer/checkpoint-1/rng_state.pth"])
def test_transformers4_files_convert(run, tmp_path, tf_root, rel):
    src = tf_root / "tf4" / rel
    out = tmp_path / "out"
    convert_ok(run, src, out)
    assert_same(load_output(out), expected_tensors(full_load(src)), rel)


def test_transformers4_sharded_bin_converts_as_a_set(run, tmp_path, tf_root):
    """pytorch_model-0000i-of-0000N.bin: any shard, the index or the folder converts the whole set (every key of the
    index, torch's tensors bit for bit); --allow-partial converts one shard alone."""
    import json

    folder = tf_root / "tf4" / "model_sharded"
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, shards
    want = {}
    for name in shards:
        want.update(expected_tensors(full_load(folder / name)))
    assert sorted(want) == sorted(index["weight_map"])
    for i, src in enumerate([folder, folder / "pytorch_model.bin.index.json", folder / shards[-1]]):
        out = tmp_path / f"out{i}"
        convert_ok(run, src, out)
        assert_same(load_output(out), want, str(src))
    out = tmp_path / "partial"
    convert_ok(run, folder / shards[0], out, "--allow-partial")
    assert_same(load_output(out), expected_tensors(full_load(folder / shards[0])), shards[0])


@pytest.mark.parametrize("rel", ["model", "trainer/checkpoint-1"])
def test_transformers4_bin_logits(run, tmp_path, tf_root, rel):
    """transformers loads our conversion of pytorch_model.bin with the model's config.json: the same logits as it
    computes from the .bin itself (bit for bit) and as transformers 4 computed when it wrote the file."""
    root = tf_root / "tf4"
    out = tmp_path / "out"
    convert_ok(run, root / rel / "pytorch_model.bin", out)
    shutil.copy(root / rel / "config.json", out / "config.json")
    ids = torch.load(root / "input_ids.pt", weights_only=True)
    got = hf_logits(out, ids)
    assert torch.equal(got, hf_logits(root / rel, ids)), "logits differ from transformers' loading of the .bin"
    ref = torch.load(root / "reference_logits.pt", weights_only=True)["trainer" if "trainer" in rel else "model"]
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5, f"{rel}: max |HF(ckptconv) - transformers 4| = {diff}"


@pytest.mark.parametrize("version", ["tf4", "tf5"])
def test_trainer_checkpoint_every_file_inspects(run, tf_root, version):
    folder = tf_root / version / "trainer" / "checkpoint-1"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    want = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    assert want <= {p.name for p in files}, files
    for f in files:
        inspect_ok(run, f)
    args = full_load(folder / "training_args.bin")
    assert type(args).__name__ == "TrainingArguments"
    rng = full_load(folder / "rng_state.pth")
    assert {"python", "numpy", "cpu"} <= set(rng), sorted(rng)


@pytest.mark.parametrize("version", ["tf4", "tf5"])
def test_trainer_optimizer_and_rng_convert(run, tmp_path, tf_root, version):
    folder = tf_root / version / "trainer" / "checkpoint-1"
    for name in ("optimizer.pt", "rng_state.pth"):
        out = tmp_path / name
        convert_ok(run, folder / name, out)
        assert_same(load_output(out), expected_tensors(full_load(folder / name)), f"{version} {name}")
