"""Shared helpers for the ckptconv end-to-end tests: binary lookup, running it, and the reference
naming rule implemented independently of the Rust code (torch.load + our own flattening).

Owns: tests/e2e/conftest.py. Binary: env CKPTCONV (default target/release/ckptconv, relative to the repo); the npm
package's `ckptconv` (js/cli.js, the CLI as wasm under Node) runs the same suite (web/test/npx.test.mjs).
"""

import json
import os
import resource
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import sys
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import manifest  # noqa: E402
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PREFIX_KEYS = ("state_dict", "model", "module", "model_state_dict")
INDEX = "model.safetensors.index.json"


def pytest_addoption(parser):
    parser.addoption("--skip-slow", action="store_true", help="skip tests marked slow (the >4 GiB zip64 case)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-GB test, run by default, skipped with --skip-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--skip-slow"):
        skip = pytest.mark.skip(reason="--skip-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def binary():
    path = Path(os.environ.get("CKPTCONV", "target/release/ckptconv"))
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        pytest.fail(f"ckptconv binary not found at {path}: run `cargo build --release` or set CKPTCONV")
    return str(path)


def runtime_rss_kib(binary):
    """Peak RSS a binary's runtime adds before converting anything: none for the native binary; under Node (the npm
    package's `ckptconv`, a script) V8, Node and the compiled module, measured at 55-80 MiB for `--version` and an
    inspect of a small file. RSS bounds of the conversion itself are checked on top of it."""
    return (64 << 10) if Path(binary).read_bytes()[:2] == b"#!" else 0


# Node reserves about 10 GiB of address space (not memory) for each wasm memory, its guard regions; the module's
# own memory is capped at 4 GiB by wasm32 whatever the cap.
NODE_RESERVE = 12 << 30


@pytest.fixture
def run(binary):
    """run(*args, timeout=, mem_limit=) -> CompletedProcess with text stdout/stderr; never raises on exit status.

    mem_limit caps the child's address space, so a runaway allocation fails inside the child instead of
    waking the machine's OOM killer (which would hit whatever else runs here)."""
    under_node = Path(binary).read_bytes()[:2] == b"#!"

    def _run(*args, timeout=120, mem_limit=None):
        if mem_limit and under_node:
            mem_limit += NODE_RESERVE
        limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))) if mem_limit else None
        r = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
        if r.returncode == 0:
            manifest.record(args)
        return r
    return _run


# --- reference naming rule ------------------------------------------------------------------------------

def has_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_tensor(v) for v in obj)
    return False


def flatten(obj, prefix=""):
    """Dotted paths of every tensor: dict keys, list/tuple indices; anything else is not descended into."""
    out = {}
    join = lambda k: f"{prefix}.{k}" if prefix else str(k)
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, join(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, join(i)))
    return out


def expected_tensors(obj, prefix=None):
    """prefix None: the automatic rule; '': everything; 'a.b': tensors under dotted path a.b, a.b. stripped."""
    if prefix is None:
        if isinstance(obj, dict):
            for k in PREFIX_KEYS:  # fixed order, first key whose dict value holds a tensor wins
                if k in obj and isinstance(obj[k], dict) and has_tensor(obj[k]):
                    return flatten(obj[k])
        return flatten(obj)
    every = flatten(obj)
    if prefix == "":
        return every
    return {k[len(prefix) + 1:]: v for k, v in every.items() if k.startswith(prefix + ".")}


def tensor_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- reading ckptconv's output --------------------------------------------------------------------------

def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def shard_files(out_dir):
    """The safetensors files the output dir announces (single file or the index's shards)."""
    out_dir = Path(out_dir)
    if (out_dir / INDEX).exists():
        assert not (out_dir / "model.safetensors").exists(), "both a single file and an index"
        index = json.loads((out_dir / INDEX).read_text())
        return [out_dir / f for f in sorted(set(index["weight_map"].values()))]
    assert (out_dir / "model.safetensors").exists(), f"no output in {out_dir}: {sorted(os.listdir(out_dir))}"
    return [out_dir / "model.safetensors"]


def load_output(out_dir):
    """All tensors of a converted dir, merging shards, checking the index agrees with the shards."""
    out_dir = Path(out_dir)
    tensors, owner = {}, {}
    for f in shard_files(out_dir):
        for k, v in load_file(f).items():
            assert k not in tensors, f"{k} appears in two shards"
            tensors[k], owner[k] = v, f.name
    if (out_dir / INDEX).exists():
        index = json.loads((out_dir / INDEX).read_text())
        assert index["weight_map"] == owner
    return tensors


def assert_same(got, want, what=""):
    """Same names, dtypes, shapes and bit-identical bytes."""
    assert sorted(got) == sorted(want), f"{what}: names differ\n only in output: {sorted(set(got) - set(want))}\n only in torch: {sorted(set(want) - set(got))}"
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, f"{what}:{k}: dtype {g.dtype} != {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"{what}:{k}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert tensor_bytes(g) == tensor_bytes(w), f"{what}:{k}: bytes differ"
