"""`ckptconv scan` (issue 19, must-show 4): a safety report of a pickle-based file that executes nothing.

Owns: tests/e2e/test_scan.py. Inputs: the public malicious-pickle corpora (picklescan's, fickling's and modelscan's
kinds, tests/security/fetch_corpora.py), the gadgets of tests/security/gadgets.py (live payloads that create a
marker file under torch.load) and every real torch.save file of tests/fixtures. Oracles: picklescan's own findings
(a file it reports a Dangerous global in must be flagged, naming that global), the globals recorded when a corpus
file or gadget was built, and torch itself (`torch.load(weights_only=True)` run on the same files in a child
process; and torch's own allowlist for the table `scan` reports with).
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

from conftest import FIXTURES, REPO

sys.path.insert(0, str(REPO / "tests" / "security"))
import policy  # noqa: E402
from ops import MARKER  # noqa: E402

CORPUS = policy.corpus_cases()
GADGET_DIR = Path(tempfile.mkdtemp(prefix="ckptconv-scan-gadgets-"))
atexit.register(shutil.rmtree, GADGET_DIR, True)
GADGETS = policy.gadget_cases(GADGET_DIR)
# Gadgets whose payload sits in a file other than the one a user would scan (a DCP .metadata, a Megatron rank
# file under its base) are scanned at the file that holds the pickle.
HOSTILE = CORPUS + GADGETS
# Files whose dangerous pickle sits in a zip entry ckptconv does not decode (the encrypted flag set): scan flags the
# file as dangerous for holding an unchecked part instead of naming the globals inside (README: Safety).
UNREADABLE = {"corpus/picklescan-1.0.5/data/malicious1_0x1.zip"}
# Files picklescan calls safe that scan flags: a global off ckptconv's allowlist that picklescan's denylist lacks
# (README: Safety).
STRICTER = {"corpus/fickling/reference_only_ast_parse.pkl"}


def scan(binary, path, cwd, *flags):
    r = subprocess.run([binary, "scan", str(path), *flags], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert "panicked" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r


def pickle_files(case):
    """The files of a case that hold pickles (a folder case: its .metadata and .pt files)."""
    p = case.path
    if p.is_file():
        return [p]
    return sorted(p.rglob(".metadata")) + sorted(p.rglob("*.pt"))


def pickle_file(case):
    return pickle_files(case)[0]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_flags_every_global_the_oracles_flag(binary, tmp_path, case):
    """Exit 1 and a report naming, as dangerous, every global picklescan reports as Dangerous in the file (or that
    was recorded when it was built); nothing created in the working folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    runs = [scan(binary, f, cwd, "--json") for f in pickle_files(case)]
    # A folder's payload may sit in any of its files: the one whose report flags the most stands for the case.
    r = max(runs, key=lambda x: (x.returncode, len(x.stdout)))
    if case.names:
        assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert r.stdout, f"no report, only an error:\n{r.stderr}"
        report = json.loads(r.stdout)
        assert report["dangerous"] is True
        flagged = {g["name"] for g in report["globals"] if g["dangerous"]}
        missing = sorted({policy.py3_name(n) for n in case.names} - flagged)
        if missing and case.id in UNREADABLE:
            # A part the reader cannot decode: flagged as unchecked instead of naming what is inside (README).
            assert report["unchecked"], report
        else:
            assert not missing, f"not flagged: {missing}; report: {report['globals']}"
    elif r.stdout:
        # picklescan flags nothing here. scan may be clean (a benign pickle among the corpus's) or stricter: a global
        # off the allowlist that picklescan's denylist does not list (fickling's `ast.parse`); each such file is
        # listed in STRICTER and the README.
        report = json.loads(r.stdout)
        assert r.returncode == (1 if report["dangerous"] else 0)
        assert report["dangerous"] == (case.id in STRICTER), f"{case.id}: {report}"
    else:
        # No global named and nothing read: a file that is no pickle container at all, an error naming it.
        assert r.returncode == 1 and r.stdout == "" and policy.ERROR_LINE.search(r.stderr), (r.stdout, r.stderr)
        assert case.shown in r.stderr
    assert not list(cwd.iterdir()), f"scan created {sorted(p.name for p in cwd.iterdir())}"
    assert not (cwd / MARKER).exists()


def real_files():
    """Every torch.save file of the fixtures but the trust ones (which name a config class on purpose)."""
    return sorted(f for f in FIXTURES.rglob("*.pt") if f.parent.name != "trust") + sorted(FIXTURES.rglob("*.bin"))


REAL = real_files()


def test_real_files_are_many_kinds():
    kinds = {str(f.relative_to(FIXTURES)).split("/")[0] for f in REAL}
    assert {"pt", "dcp", "megatron", "verl", "lora", "sample", "hf_sets"} <= kinds, kinds
    assert len(REAL) >= 40, len(REAL)


@pytest.mark.parametrize("path", REAL, ids=[str(f.relative_to(FIXTURES)) for f in REAL])
def test_real_checkpoints_are_clean(binary, tmp_path, path):
    r = scan(binary, path, tmp_path, "--json")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    report = json.loads(r.stdout)
    assert report["dangerous"] is False
    assert report["globals"], "a torch.save file names at least its tensor rebuild"
    assert all(not g["dangerous"] for g in report["globals"])


def test_text_report_says_what_it_found(binary, tmp_path):
    gadget = next(c for c in GADGETS if "os.system" in {policy.py3_name(n) for n in c.names})
    r = scan(binary, pickle_file(gadget), tmp_path)
    assert r.returncode == 1
    assert re.search(r"^  os\.system +not allowlisted, known code-executing", r.stdout, re.M), r.stdout
    assert "verdict: DANGEROUS" in r.stdout and "torch.load(weights_only=True): refuses" in r.stdout
    clean = scan(binary, FIXTURES / "sample" / "full_weights.pt", tmp_path)
    assert clean.returncode == 0
    assert "torch._utils._rebuild_tensor_v2" in clean.stdout and "tensor rebuild" in clean.stdout
    assert "verdict: clean" in clean.stdout and "ckptconv: converts it (" in clean.stdout


def test_usage_error_exits_2(binary, tmp_path):
    r = subprocess.run([binary, "scan"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2


TORCH_LOAD = r"""
import json, sys, torch
out = {}
for p in sys.argv[1:]:
    try:
        torch.load(p, weights_only=True, map_location="cpu")
        out[p] = True
    except Exception as e:
        out[p] = False
print(json.dumps(out))
"""


def test_weights_only_verdict_agrees_with_torch(binary, tmp_path):
    """Where torch.load(weights_only=True) loads a file, scan says it accepts every global named; where scan says
    torch would refuse a global, torch does refuse the file. Run in one child whose working folder stays empty
    (weights_only loading executes nothing; the marker would show otherwise)."""
    files = [str(f) for f in REAL] + [str(pickle_file(c)) for c in HOSTILE if pickle_file(c).is_file()]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-c", TORCH_LOAD, *files], capture_output=True, text=True, cwd=cwd,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    loads = json.loads(r.stdout.strip().splitlines()[-1])
    assert not (cwd / MARKER).exists() and not list(cwd.iterdir())
    wrong = []
    for f in files:
        s = scan(binary, f, tmp_path, "--json")
        if not s.stdout:
            assert not loads[f], f"torch loads {f}, scan cannot read it: {s.stderr}"
            continue
        says = json.loads(s.stdout)["weights_only"]
        if loads[f] and not says:
            wrong.append(f"{f}: torch loads it, scan says it would refuse")
    assert not wrong, "\n".join(wrong)
    assert loads[str(FIXTURES / "sample" / "full_weights.pt")], "a plain state dict loads under weights_only"


def test_weights_only_table_is_torchs():
    """The table scan reports with is torch's own `_get_allowed_globals()` (for the torch the tests run)."""
    import torch
    import torch._weights_only_unpickler as w

    src = (REPO / "src" / "scan.rs").read_text()
    table = src.split("const TORCH_WEIGHTS_ONLY: &[&str] = &[", 1)[1].split("];", 1)[0]
    ours = set(re.findall(r'"([^"]+)"', table))
    theirs = set(w._get_allowed_globals())
    if not torch.__version__.startswith("2.15."):
        pytest.skip(f"the table is torch 2.15's; this is torch {torch.__version__}")
    assert ours == theirs, (sorted(ours - theirs), sorted(theirs - ours))
