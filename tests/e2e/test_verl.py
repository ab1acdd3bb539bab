"""verl FSDP checkpoints (per-rank torch.save files of DTensor shards) against what real torch gathered.

Owns: tests/e2e/test_verl.py. Fixtures: tests/fixtures/make_verl_fixtures.py -> tests/fixtures/verl/.
The expected tensors are `DTensor.full_tensor()` results that torch computed when it wrote the shards.
"""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FIXTURES, assert_same, load_output

VERL = FIXTURES / "verl"


@pytest.mark.parametrize("folder", ["fsdp2_ws2", "fsdp2_ws2/actor", "layouts_ws4"])
def test_verl_matches_full_tensor(run, tmp_path, folder):
    out = tmp_path / "out"
    r = run("convert", VERL / folder, out)
    assert r.returncode == 0, r.stderr
    assert "verl FSDP checkpoint" in r.stderr
    want = torch.load(VERL / folder.split("/")[0] / "full_reference.pt", weights_only=True)
    assert_same(load_output(out), want, folder)


def test_verl_model_reproduces_logits(run, tmp_path):
    out = tmp_path / "hf"
    r = run("convert", VERL / "fsdp2_ws2", out)
    assert r.returncode == 0, r.stderr
    shutil.copy(VERL / "fsdp2_ws2" / "config.json", out / "config.json")
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    ids = torch.load(VERL / "fsdp2_ws2" / "input_ids.pt", weights_only=True)
    want = torch.load(VERL / "fsdp2_ws2" / "reference_logits.pt", weights_only=True)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_single_rank_file_is_refused(run, tmp_path):
    f = VERL / "fsdp2_ws2" / "actor" / "model_world_size_2_rank_1.pt"
    r = run("convert", f, tmp_path / "out")
    assert r.returncode == 1
    assert "DTensor shard" in r.stderr and str(f) in r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_rank_is_refused(run, tmp_path):
    broken = tmp_path / "actor"
    shutil.copytree(VERL / "layouts_ws4", broken)
    (broken / "model_world_size_4_rank_2.pt").unlink()
    r = run("convert", broken, tmp_path / "out")
    assert r.returncode == 1
    assert "rank 2 of 4 is missing" in r.stderr
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True
