"""The hostile corpus: every input under tests/hostile/ that ckptconv must refuse, the command that feeds it, and
the error it must give. Imported by tests/e2e/test_hostile.py (native) and wasi/test_wasi.py (under wasmtime).

Owns: tests/hostile/corpus.py. Three generators write the corpus, each with its own expected.json:
  tests/hostile/make_hostile.py                  files directly in tests/hostile/ (pickles, zips, legacy files)
  tests/fixtures/make_dcp_fixtures.py --only broken    folders in tests/hostile/dcp/ (copies of a real DCP save)
  tests/fixtures/make_megatron_fixtures.py --only broken   folders in tests/hostile/megatron/ (real Megatron ranks)
Inputs too big to commit are built at test time by tests/hostile/generated.py and checked by their own tests.
Each entry says `kind` (the label in `ckptconv: error[KIND]:`), `expect` (substrings, one of which the lowercased
message must hold once the input's own path is taken out, since names like truncated_half.pt hold the words),
optionally `names` (one must appear: the offending file or tensor; default: the entry's own name) and `why`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = {"io", "truncated", "zip", "pickle", "limit", "unsafe-global", "not-checkpoint", "tensor", "inconsistent",
         "no-tensors", "unsupported", "output", "verify", "config"}  # ckptconv's ErrorKind labels (src/error.rs)


@dataclass(frozen=True)
class Case:
    id: str  # "pickle_os_system.pt", "dcp/chunk_gap", "megatron/norm_differs"
    path: Path  # the hostile file or folder
    kind: str
    expect: tuple
    names: tuple
    why: str

    def argv(self, inp, out):
        """The command for this input, with `inp` spelling self.path and `out` the output folder."""
        if self.id.startswith("megatron/"):
            return ["mg2hf", f"{inp}/actor", str(out), f"{inp}/base_hf"]  # the original script's argument order
        return ["convert", str(inp), str(out)]


def _load(folder, prefix):
    spec = json.loads((folder / "expected.json").read_text())
    for name, e in sorted(spec.items()):
        if name.startswith("_"):
            continue
        assert e.get("kind") in KINDS, f"{folder / 'expected.json'}: {name}: kind {e.get('kind')!r} is not one of {KINDS}"
        yield Case(prefix + name, folder / name, e["kind"], tuple(e["expect"]), tuple(e.get("names", [name])), e["why"])


def cases():
    return [*_load(HERE, ""), *_load(HERE / "dcp", "dcp/"), *_load(HERE / "megatron", "megatron/")]


def unlisted():
    """Inputs present on disk that no expected.json lists (a corpus entry nobody checks)."""
    listed = {c.path for c in cases()}
    found = [p for p in HERE.iterdir() if p.is_file() and p.suffix == ".pt"]
    found += [p for sub in ("dcp", "megatron") for p in (HERE / sub).iterdir() if p.is_dir()]
    return sorted(str(p.relative_to(HERE)) for p in found if p not in listed)
