"""Which command runs ckptconv.wasm under wasmtime, for wasi/test_wasi.py and bench/bench_wasi.py.

Owns: wasi/runner.py. Env CKPTCONV_WASM_RUNNER (a command line, e.g. "wasmtime run"); else `wasmtime run` when
the wasmtime CLI is on PATH; else `python wasi/run.py` (PyPI wasmtime, the same flags).
"""

import os
import shlex
import shutil
import sys
from pathlib import Path


def runner_prefix():
    env = os.environ.get("CKPTCONV_WASM_RUNNER")
    if env:
        return shlex.split(env)
    if shutil.which("wasmtime"):
        return ["wasmtime", "run"]
    return [sys.executable, str(Path(__file__).resolve().parent / "run.py")]
