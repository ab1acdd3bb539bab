"""The page test's sample of pickle-policy cases, with the native CLI's verdict on each (web/test/policy.test.mjs).

Owns: tests/security/policy_cases.py. Builds the gadgets into OUT/gadgets, takes every gadget and an evenly spread
sample of the public corpus files (tests/security/policy.py), runs `ckptconv inspect` on each (what the page does when
given the input: plan it) and writes OUT/cases.json:
  [{id, input (absolute), folder (give it as a folder), base (absolute or null), code, message, names}]
where `message` is the CLI's error text without its `ckptconv: error[LABEL]: ` prefix and with the input's parent
folder taken off the paths (the page knows only a dropped file's or folder's own name), `label` that LABEL, and
`names` the globals among the case's candidates the CLI names.

  .venv/bin/python tests/security/policy_cases.py OUT [--corpus N] [--native PATH]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import policy  # noqa: E402


def sample(cases, n):
    if n >= len(cases):
        return cases
    step = len(cases) / n
    return [cases[int(i * step)] for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--corpus", type=int, default=20, help="how many corpus files (default 20)")
    ap.add_argument("--native", default=str(HERE.parents[1] / "target" / "release" / "ckptconv"))
    a = ap.parse_args()
    out = Path(a.out)
    cases = policy.gadget_cases(out / "gadgets") + sample(sorted(policy.corpus_cases(), key=lambda c: c.id), a.corpus)
    rows = []
    for c in cases:
        base = c.root / c.base if c.base else None
        r = subprocess.run([a.native, *c.argv("inspect", c.path, None, base)], capture_output=True, text=True,
                           timeout=120)
        label, text = policy.error_text(r.stderr)
        message = text.split("\n")[0]
        if label:
            message = message[len(f"ckptconv: error[{label}]: "):]
        message = message.replace(str(c.path.parent) + "/", "")
        rows.append({"id": c.id, "input": str(c.path), "folder": c.path.is_dir(), "base": str(base) if base else None,
                     "code": r.returncode, "label": label, "message": message, "stderr": r.stderr,
                     "candidates": c.candidates, "names": sorted(policy.named(text, c.candidates))})
    (out / "cases.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
