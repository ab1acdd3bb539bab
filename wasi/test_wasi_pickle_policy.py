"""Issue #16's pickle policy under WASI: the same verdict as the native binary on every public corpus file and gadget.

Owns: wasi/test_wasi_pickle_policy.py. The cases are tests/e2e/test_pickle_policy.py's (tests/security/policy.py: the
public corpora of tests/security/fetch_corpora.py and the gadgets of tests/security/gadgets.py, built per session).
Each input's folder is mounted as /in and an empty folder as /out; `inspect` and `convert` run under WASI (256 MiB
linear-memory cap) and natively. Both must exit 1 with the same error label, name the same globals and give the same
error text once host folders are spelled as their mounts; nothing is written to /out and nothing traps. Whether the
label and names are the right ones is tests/e2e/test_pickle_policy.py's concern.

Runner, module and native binary as in wasi/test_wasi.py (CKPTCONV_WASM_RUNNER, CKPTCONV_WASM, CKPTCONV).
"""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "wasi"))
sys.path.insert(0, str(REPO / "tests" / "security"))
import policy  # noqa: E402
from runner import runner_prefix  # noqa: E402

WASM = Path(os.environ.get("CKPTCONV_WASM", REPO / "target/wasi/ckptconv.wasm"))
NATIVE = Path(os.environ.get("CKPTCONV", REPO / "target/release/ckptconv"))
WASM, NATIVE = (p if p.is_absolute() else REPO / p for p in (WASM, NATIVE))
CAP = 256 << 20
OS_ERROR = re.compile(r" \(os error \d+\).*$", re.M)  # errno values differ under WASI

CORPUS = policy.corpus_cases()
GADGET_DIR = Path(tempfile.mkdtemp(prefix="ckptconv-gadgets-wasi-"))
atexit.register(shutil.rmtree, GADGET_DIR, True)
GADGETS = policy.gadget_cases(GADGET_DIR)
CASES = [(c, cmd) for c in CORPUS + GADGETS for cmd in ("inspect", "convert")]


@pytest.fixture(scope="module", autouse=True)
def built():
    for what, p, how in (("WASI module", WASM, "bash wasi/build.sh"), ("native binary", NATIVE, "cargo build --release")):
        if not p.is_file():
            pytest.fail(f"{what} not found at {p}: run `{how}`")


def normalized(stderr, roots):
    label, text = policy.error_text(stderr)
    for host, mount in roots:
        text = text.replace(str(host), mount)
    return label, OS_ERROR.sub("", text)


@pytest.mark.parametrize("case,cmd", CASES, ids=[f"{c.id}:{cmd}" for c, cmd in CASES])
def test_same_verdict_as_native(tmp_path, case, cmd):
    out, native_out = tmp_path / "out", tmp_path / "native"
    out.mkdir()
    argv = case.argv(cmd, f"/in/{case.rel}", "/out/hf", f"/in/{case.base}")
    w = subprocess.run([*runner_prefix(), "--dir", f"{case.root}::/in", "--dir", f"{out}::/out", "-W",
                        f"max-memory-size={CAP}", str(WASM), *argv], capture_output=True, text=True, timeout=120)
    base = case.root / case.base if case.base else None
    n = subprocess.run([str(NATIVE), *case.argv(cmd, case.path, native_out / "hf", base)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert w.returncode == 1, f"WASI exit {w.returncode} (134 = trap), stderr:\n{w.stderr[-3000:]}"
    assert n.returncode == 1, f"native exit {n.returncode}, stderr:\n{n.stderr[-3000:]}"
    assert "panicked" not in w.stderr and "trap" not in w.stderr, w.stderr
    wl, wt = normalized(w.stderr, [])
    nl, nt = normalized(n.stderr, [(native_out, "/out"), (case.root, "/in")])
    assert wl == nl, f"WASI error[{wl}], native error[{nl}]:\n{w.stderr}\n{n.stderr}"
    assert policy.named(wt, case.candidates) == policy.named(nt, case.candidates), f"different globals named:\n{wt}\n{nt}"
    assert wt == nt, "WASI and native errors differ"
    assert not [p for p in out.rglob("*") if p.is_file()], "output written under WASI"
