"""The output manifest: sha256 of every file the test suites' successful conversions write, per test and call.

A refactor must not change a byte of output. Each successful run that tests/e2e (the `run` fixture) and wasi/ (its
`both` helper: native and WASI, which it asserts equal) make is recorded under "<test id>#<call>": its output files
by relative name with size and sha256. By default every recorded run is checked against the committed manifest
(tests/manifest/cli.json), so a changed byte fails the test that made it. CKPTCONV_MANIFEST=record writes the
manifest instead (run the suite twice: entries whose bytes differ between the two runs come from inputs made at
test time with unseeded randomness and are dropped as unstable). Inputs trained at test time (a DeepSpeed, FSDP or
Trainer step) also differ between machines, with the CPU's matmul kernels (AMX / AVX-512 against AVX2): their entries
are listed as unstable by hand (the tests still compare those outputs with the real library's).

Owns: tests/manifest.py, tests/manifest/cli.json.
"""

import atexit
import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "manifest" / "cli.json"
REPO = str(Path(__file__).resolve().parents[1]).encode()
# Outputs that record a path they were given (a PEFT adapter_config's base_model_name_or_path) name the checkout's
# folder; small files are hashed with it spelled "<repo>", so the manifest holds wherever the repo is cloned.
NORMALIZE_BELOW = 4 << 20
MODE = os.environ.get("CKPTCONV_MANIFEST", "check")
_calls = {}
_recorded = {}
_committed = None


def _load():
    global _committed
    if _committed is None:
        _committed = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"runs": {}, "unstable": []}
    return _committed


def _size_sha(path):
    size = path.stat().st_size
    if size < NORMALIZE_BELOW:
        data = path.read_bytes().replace(REPO, b"<repo>")
        return f"{len(data)}:{hashlib.sha256(data).hexdigest()}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{size}:{h.hexdigest()}"


def tree_hashes(root):
    """{relative name: "size:sha256"} of every file under root (or of root itself, when it is a file)."""
    root = Path(root)
    if root.is_file():
        return {root.name: _size_sha(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = _size_sha(p)
    return out


def output_of(args):
    """Where a CLI command line writes: convert/mg2hf OUT, dcp-to-pt's --output_path, pt2hf's convertor.save_path."""
    args = [str(a) for a in args]
    if not args:
        return None
    cmd = args[0]
    positional = [a for a in args[1:] if not a.startswith("--")]
    if cmd in ("convert", "mg2hf") and len(positional) >= 2:
        return Path(positional[1])
    for i, a in enumerate(args):
        if cmd == "dcp-to-pt" and a in ("--output_path", "--output-path") and i + 1 < len(args):
            return Path(args[i + 1])
        if cmd == "pt2hf" and a == "--config" and i + 1 < len(args):
            cfg = Path(args[i + 1])
            m = re.search(r"^\s*save_path:\s*['\"]?([^'\"\n]+)", cfg.read_text(), re.M) if cfg.is_file() else None
            if m:
                p = Path(m.group(1).strip())
                return p if p.is_absolute() else cfg.parent / p
    return None


def record(args, out=None, key=None):
    """Records (or checks) the outputs of one successful run of `args` in the current test; `out` overrides where
    they are, `key` the test id (for runs cached across tests)."""
    test_id = key or os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    out = Path(out) if out is not None else output_of(args)
    if out is None or not out.exists():
        return
    n = _calls.get(test_id, 0)
    _calls[test_id] = n + 1
    key = f"{test_id}#{n}"
    hashes = tree_hashes(out)
    if not hashes:
        return
    if MODE == "record":
        _recorded[key] = hashes
        return
    committed = _load()
    want = committed["runs"].get(key)
    if want is None or key in committed["unstable"]:
        return
    assert hashes == want, (
        f"output manifest: {key} ({' '.join(map(str, args))}) wrote other bytes than tests/manifest/cli.json records:\n"
        f"  now:      {hashes}\n  recorded: {want}\n(CKPTCONV_MANIFEST=record regenerates it, twice, after an intended change)"
    )


def _write():
    if MODE != "record" or not _recorded:
        return
    previous = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"runs": {}, "unstable": []}
    runs = dict(previous.get("runs", {}))
    unstable = set(previous.get("unstable", []))
    for k, v in _recorded.items():
        if k in runs and runs[k] != v and os.environ.get("CKPTCONV_MANIFEST_FRESH") != "1":
            unstable.add(k)
        runs[k] = v
    MANIFEST.parent.mkdir(exist_ok=True)
    MANIFEST.write_text(json.dumps({"runs": dict(sorted(runs.items())), "unstable": sorted(unstable)}, indent=1) + "\n")


atexit.register(_write)
