"""The pickle-policy cases (issue #16, must-show 1) shared by the native, WASI and page tests.

Owns: tests/security/policy.py. A case is one input ckptconv must refuse: every file of the public corpora
(tests/security/fetch_corpora.py) and every gadget (tests/security/gadgets.py). For each it says which refusal labels
are acceptable (unsafe-global unless the corpus manifest documents others for a file that is no pickle container
ckptconv reads), which globals the message must name when the label is unsafe-global (for a corpus file: every global
picklescan reports as Dangerous, bar the manifest's `not_globals`, plus the globals the manifest records; for a gadget:
its recorded globals), and which file name it must show.

Used by tests/e2e/test_pickle_policy.py, wasi/test_wasi_pickle_policy.py and, through policy_cases.py, the page test
web/test/policy.test.mjs.
"""

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fetch_corpora  # noqa: E402
import gadgets as gadget_module  # noqa: E402

ERROR_LINE = re.compile(r"^ckptconv: error\[([a-z-]+)\]: ", re.M)


@dataclass
class Case:
    id: str  # "corpus/picklescan/data/malicious0.pkl", "gadget/obj_os_system"
    root: Path  # the folder holding the input (mounted as /in under WASI)
    rel: str  # the input, relative to root
    labels: list  # acceptable refusal labels
    names: list  # globals the message must name when the label is unsafe-global
    shown: str  # the file name the message must show
    base: str = ""  # a --base folder, relative to root
    labels_why: str = ""
    candidates: list = field(default_factory=list)  # every global that could be named (for comparing front ends)
    live: str = ""  # gadgets: how the payload was shown to be live

    @property
    def path(self):
        return self.root / self.rel

    def argv(self, cmd, inp, out, base=None):
        """The command line for `cmd` (inspect or convert) with the input spelled `inp`, output `out`."""
        args = ["inspect", inp] if cmd == "inspect" else ["convert", inp, out]
        if self.base:
            args += ["--base", base]
        return [str(a) for a in args]


def picklescan_globals(path):
    """[(module.name, safety)] picklescan reports for the file (its Python API, never loading the file)."""
    from picklescan.scanner import scan_file_path

    return [(f"{g.module}.{g.name}", g.safety.name) for g in scan_file_path(str(path)).globals]


def corpus_cases():
    m = fetch_corpora.ensure()
    not_globals = set(m["not_globals"])
    out = []
    for f in m["files"]:
        path = fetch_corpora.CACHE / f["path"]
        found = picklescan_globals(path)
        dangerous = {n for n, level in found if level == "Dangerous"} - not_globals
        names = sorted(dangerous | set(f.get("names", [])))
        out.append(Case(f"corpus/{f['path']}", path.parent, path.name, f.get("labels", ["unsafe-global"]), names,
                        path.name, labels_why=f.get("labels_why", ""),
                        candidates=sorted({n for n, _ in found} - not_globals | set(names))))
    return out


def gadget_cases(root):
    """Builds the gadgets into `root` (emptied first) and returns their cases."""
    gs = gadget_module.build(root)
    return [Case(f"gadget/{g.id}", Path(root), g.path, ["unsafe-global"], list(g.names), Path(g.load or g.path).name,
                 base=g.base, candidates=list(g.names), live=g.live) for g in gs]


# Python 3 reads a protocol 0-2 pickle's Python 2 module names as these (_compat_pickle.IMPORT_MAPPING), and so does
# ckptconv when it names them; picklescan reports them as spelled.
PY3_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def py3_name(name):
    module, _, rest = name.partition(".")
    return f"{PY3_MODULES.get(module, module)}.{rest}" if rest else name


def named(text, names):
    """The names among `names` that `text` spells as a whole dotted name (os.system is not named by posix.system
    nor by pathlib.os.system; a sentence's full stop after it is fine), as spelled or in Python 3's spelling."""
    def spelled(n):
        return re.search(r"(?<![\w])(?<![\w]\.)" + re.escape(n) + r"(?![\w])(?!\.\w)", text)
    return {n for n in names if spelled(n) or spelled(py3_name(n))}


def error_text(stderr):
    """(label, the text from the first error line on) of a run's stderr, or (None, stderr)."""
    m = ERROR_LINE.search(stderr)
    if not m:
        return None, stderr
    return m.group(1), stderr[m.start():]
