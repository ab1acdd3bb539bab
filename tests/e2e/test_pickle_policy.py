"""Issue #16's pickle trust policy against the native binary: public malicious-pickle corpora and our gadgets are
refused, real checkpoints are not.

Owns: tests/e2e/test_pickle_policy.py. Cases come from tests/security/policy.py:
  - every file of the public corpora (tests/security/fetch_corpora.py: picklescan's own test data, the files its
    1.0.5 tests expect rebuilt from those expectations, and the kinds fickling's and modelscan's tests build), and
  - every gadget of tests/security/gadgets.py (one real checkpoint per route the issue names), built per session.
For each, `inspect` and `convert` must exit 1 with one `ckptconv: error[LABEL]:` line, LABEL `unsafe-global` (or a
label the corpus manifest documents for that file, which is no pickle container ckptconv reads), the message naming
the file and, with unsafe-global, every global picklescan 1.0.5 reports as Dangerous in it plus the globals recorded
for it (`module.name`, as the pickle spells them); nothing written to the output folder; no marker file created in
the working folder. The gadgets' payloads are shown to be live: torch.load (pickle.load for the DCP .metadata) of each
creates the marker (test_gadget_payloads_are_live). Public corpus files are never loaded.
Must-show 2: every torch / DCP / Megatron / verl / LoRA fixture of tests/fixtures passes `inspect` (exit 0).
WASI and the page give the same verdicts: wasi/test_wasi_pickle_policy.py, web/test/policy.test.mjs.
"""

import atexit
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import FIXTURES, INDEX, REPO

sys.path.insert(0, str(REPO / "tests" / "security"))
import fetch_corpora  # noqa: E402
import policy  # noqa: E402
from ops import MARKER  # noqa: E402

CORPUS = policy.corpus_cases()
GADGET_DIR = Path(tempfile.mkdtemp(prefix="ckptconv-gadgets-"))
atexit.register(shutil.rmtree, GADGET_DIR, True)
GADGETS = policy.gadget_cases(GADGET_DIR)


def test_corpora_are_there():
    m = fetch_corpora.ensure()
    sources = {f["source"].split(" ")[0].split("-")[0] for f in m["files"]}
    assert sources == {"picklescan", "fickling", "modelscan"}, sources
    assert len(CORPUS) >= 150, len(CORPUS)
    # A refusal that must name nothing would test little: every file that can only be refused as unsafe-global has
    # at least one global to name (from picklescan or recorded when it was built).
    bare = [c.id for c in CORPUS if c.labels == ["unsafe-global"] and not c.names]
    assert not bare, f"no global to name for {bare}"
    assert len(GADGETS) >= 30


def test_gadget_payloads_are_live(tmp_path):
    """torch.load(weights_only=False) (pickle.load for the DCP metadata; a backward pass for the hook) of each live
    gadget, in a forked child with an empty working folder, creates the marker: the payloads are real."""
    r = subprocess.run([sys.executable, str(REPO / "tests" / "security" / "gadgets.py"), str(GADGET_DIR), "--no-build",
                        "--live", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    live = json.loads(r.stdout)
    want = {c.id.split("/", 1)[1] for c in GADGETS if c.live}
    assert set(live) == want
    assert [g for g, created in live.items() if not created] == [], "payloads that did not run under torch.load"
    assert len(want) >= 30, sorted(want)


CASES = [(c, cmd) for c in CORPUS + GADGETS for cmd in ("inspect", "convert")]


@pytest.mark.parametrize("case,cmd", CASES, ids=[f"{c.id}:{cmd}" for c, cmd in CASES])
def test_refused(binary, tmp_path, case, cmd):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    base = case.root / case.base if case.base else None
    r = subprocess.run([binary, *case.argv(cmd, case.path, out, base)], capture_output=True, text=True, timeout=120,
                       cwd=cwd)
    err = r.stderr
    assert r.returncode == 1, f"exit {r.returncode}, stderr:\n{err[-3000:]}"
    assert "panicked" not in err and "internal error" not in err, err
    assert len(policy.ERROR_LINE.findall(err)) == 1, f"expected one error line:\n{err}"
    label, text = policy.error_text(err)
    assert label in case.labels, (f"error[{label}], expected {' or '.join(case.labels)}"
                                  f"{' (' + case.labels_why + ')' if case.labels_why else ''}:\n{err}")
    assert case.shown in text, f"the message does not name the file {case.shown}:\n{err}"
    if label in ("unsafe-global", "truncated"):  # a cut-off stream names what it named before it broke off
        missing = sorted(set(case.names) - policy.named(text, case.names))
        assert not missing, f"the refusal does not name {missing} (must name {case.names}):\n{err}"
    if out.exists():
        left = [p.name for p in out.rglob("*") if p.is_file()]
        assert not left, f"output written: {left}"
        assert not (out / INDEX).exists()
    assert not list(cwd.iterdir()), f"ckptconv created {sorted(p.name for p in cwd.iterdir())}"
    assert not (cwd / MARKER).exists()


# --- must-show 2: real checkpoints are not refused ------------------------------------------------------------------

def fixture_inputs():
    """Every checkpoint in tests/fixtures as a user gives it: standalone .pt files, DCP folders (any folder holding
    .metadata), verl rank folders and Megatron actor / actor_dist folders (with their base_hf). Every .pt and .metadata
    file of the fixtures is read by at least one of them (checked in the test)."""
    inputs = []
    for meta in sorted(FIXTURES.rglob(".metadata")):
        inputs.append((meta.parent, None))
    verl = sorted({p.parent for p in FIXTURES.rglob("model_world_size_*_rank_0.pt")})
    inputs += [(d, None) for d in verl]
    megatron = sorted(p for p in FIXTURES.glob("megatron*/*/actor*") if p.is_dir())  # dense, MoE and MLA
    inputs += [(d, d.parent / "base_hf") for d in megatron]
    for f in sorted(FIXTURES.rglob("*.pt")):
        if re.search(r"/megatron(_moe|_mla)?/.*/iter_", str(f)) or f.name.startswith("model_world_size_"):
            continue  # a rank file of a folder format, read with its folder above
        if f.parent.name == "trust":
            continue  # needs --allow-global by design (tests/e2e/test_trust.py)
        inputs.append((f, None))
    return inputs


FIXTURE_INPUTS = fixture_inputs()


def test_every_fixture_pickle_is_inspected():
    pickles = {p for p in set(FIXTURES.rglob("*.pt")) | set(FIXTURES.rglob(".metadata")) if p.parent.name != "trust"}
    covered = {p for p in pickles if any(p == i or i in p.parents for i, _ in FIXTURE_INPUTS)}
    assert pickles - covered == set()
    kinds = {str(i.relative_to(FIXTURES)).split("/")[0] for i, _ in FIXTURE_INPUTS}
    assert {"pt", "dcp", "megatron", "verl", "lora", "sample"} <= kinds, kinds


@pytest.mark.parametrize("inp,base", FIXTURE_INPUTS, ids=[str(i.relative_to(FIXTURES)) for i, _ in FIXTURE_INPUTS])
def test_fixture_inspects(run, inp, base):
    r = run("inspect", inp, *(["--base", base] if base else []))
    assert r.returncode == 0, f"inspect {inp} failed:\n{r.stderr[-3000:]}"
    assert "error[" not in r.stderr
