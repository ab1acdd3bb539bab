"""The user's side of the pickle allowlist (issue #16): a real checkpoint with a config class off the list is
refused by name, as torch's weights_only loader refuses it; `--allow-global` accepts it, as
torch.serialization.add_safe_globals does, and the tensors are torch's; a global the pickle only names converts
with a note.

Owns: tests/e2e/test_trust.py. Fixture: tests/fixtures/make_trust_fixtures.py (real torch.save).
"""

import os
import pickle
import types

import pytest
import torch

from conftest import FIXTURES, assert_same, load_output

CONFIG_PT = FIXTURES / "trust" / "simple_namespace_config.pt"
GLOBAL = "types.SimpleNamespace"


def torch_model():
    return torch.load(CONFIG_PT, weights_only=False, map_location="cpu")["model"]


def test_torch_weights_only_refuses_it_too():
    # The fixture is the kind of file the flag is for: torch's own allowlist refuses it until the user allows it.
    with pytest.raises(pickle.UnpicklingError, match="SimpleNamespace"):
        torch.load(CONFIG_PT, weights_only=True)
    with torch.serialization.safe_globals([types.SimpleNamespace]):
        assert torch.load(CONFIG_PT, weights_only=True)["config"].layers == 2


@pytest.mark.parametrize("cmd", ["inspect", "convert"])
def test_refused_naming_the_global_and_the_flag(run, tmp_path, cmd):
    out = tmp_path / "out"
    r = run(cmd, CONFIG_PT, *([out] if cmd == "convert" else []))
    assert r.returncode == 1, r.stderr
    assert "error[unsafe-global]" in r.stderr and str(CONFIG_PT) in r.stderr, r.stderr
    assert f"{GLOBAL} (called by REDUCE, pickle byte " in r.stderr, r.stderr
    assert f"--allow-global {GLOBAL}" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_allow_global_converts_to_torchs_tensors(run, tmp_path):
    out = tmp_path / "out"
    r = run("convert", CONFIG_PT, out, "--allow-global", GLOBAL)
    assert r.returncode == 0, r.stderr
    assert_same(load_output(out), torch_model())


def test_allowing_another_global_is_not_enough(run, tmp_path):
    r = run("convert", CONFIG_PT, tmp_path / "out", "--allow-global", "types.ModuleType")
    assert r.returncode == 1 and f"--allow-global {GLOBAL}" in r.stderr, r.stderr


@pytest.mark.parametrize("bad", ["types", "types.", "types.Simple Namespace", ""])
def test_allow_global_takes_module_dot_name(run, tmp_path, bad):
    r = run("convert", CONFIG_PT, tmp_path / "out", "--allow-global", bad)
    assert r.returncode == 2 and "MODULE.NAME" in r.stderr, r.stderr


def test_a_global_only_named_converts_with_a_note(run, tmp_path):
    # A config that names a function (as Megatron's args name activations) without calling it: data, reported.
    src = tmp_path / "named.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "config": {"hook": os.system}}, src)
    r = run("convert", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert f"names a global off ckptconv's allowlist without calling it: {os.system.__module__}.system" in r.stderr
    assert_same(load_output(tmp_path / "out"), {"w": torch.load(src, weights_only=False)["w"]})


def test_a_dcp_metadata_naming_a_global_converts_with_a_note(run, tmp_path):
    import shutil

    src = FIXTURES / "dcp" / "fsdp2_ws2" / "global_step_1" / "actor" / "dcp_checkpoint"
    dcp = tmp_path / "dcp"
    shutil.copytree(src, dcp)
    with open(dcp / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own fixture, written by torch.distributed.checkpoint
    meta.planner_data = {"hook": os.system}
    with open(dcp / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    r = run("inspect", dcp)
    assert r.returncode == 0, r.stderr
    assert f"without calling it: {os.system.__module__}.system (pickle byte " in r.stdout, r.stdout


def test_allow_global_reaches_a_deflated_data_pkl(run, tmp_path):
    # The same checkpoint re-zipped with every entry deflated: its pickle is read through the inflater.
    import zipfile

    src = tmp_path / "deflated.pt"
    with zipfile.ZipFile(CONFIG_PT) as zin, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    r = run("convert", src, tmp_path / "refused")
    assert r.returncode == 1 and f"--allow-global {GLOBAL}" in r.stderr, r.stderr
    r = run("convert", src, tmp_path / "out", "--allow-global", GLOBAL)
    assert r.returncode == 0, r.stderr
    assert_same(load_output(tmp_path / "out"), torch_model())
