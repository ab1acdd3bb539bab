"""Names that would drive a terminal (issue #16): tensor names, zip entry names, byte order, storage keys and
global names that hold ESC sequences, CR, NUL, BEL, C1 controls, bidi overrides and invisible characters. Built at
test time with real torch; imported by tests/e2e/test_terminal.py (native) and wasi/test_wasi.py (under wasmtime).

Owns: tests/hostile/terminal.py.
"""

import io
import unicodedata
import zipfile

# Each would change what a terminal shows if printed raw. Keys are kept distinct after ckptconv's dotted naming.
HOSTILE_NAMES = [
    "erase\x1b[2K\rOK",  # erase the line, return, print a fake verdict
    "bell\x07ring",
    "nul\x00byte",
    "carriage\rreturn",
    "new\nckptconv: error[fake]: line",
    "rlo\u202egnp.weight",  # right-to-left override
    "isolate\u2066lri\u2069",  # left-to-right isolate ... pop
    "zero\u200bwidth\u200djoiner",
    "csi_c1\x9b2J",  # C1 CSI, which some terminals act on
    "del\x7fete",
    "nel_c1\x85line",
    "bom\ufeffmark",
    "tab\tstop",
    "backspace\x08\x08\x08",
    "osc\x1b]0;pwned title\x07",  # set the window title
    "lrm\u200erlm\u200f",
    "tag\U000e0041\U000e0042",  # invisible tag characters
    "line\u2028para\u2029sep",
    "reset\x1bc",
    "vt\x0bff\x0c",
]
PLAIN_NAMES = ["model.embed_tokens.weight", "模型.权重", "poids.équipe"]  # must pass through untouched
PAYLOAD = "\x1b[2K\rOK\x07\u202e"  # what the hand-edited structures carry


def is_unsafe(c):
    """A character that must not reach a terminal raw: every control and format character (Cc, Cf) and the line
    and paragraph separators. Line feeds between output lines are checked by the callers."""
    return unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")


def escaped(s):
    """`s` as ckptconv shows it (src/error.rs display_safe), for the characters is_unsafe finds."""
    return "".join(c if not is_unsafe(c) else f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{{{ord(c):x}}}" for c in s)


def assert_terminal_safe(data, what, lines=None):
    """`data` (bytes a process wrote) is valid UTF-8 with no unsafe character but the newlines that end lines,
    and, when `lines` is given, exactly that many lines."""
    bad = [b for b in data if b < 0x20 and b != 0x0A or b == 0x7F]
    assert not bad, f"{what}: raw control bytes {sorted(set(bad))} in {data!r}"
    text = data.decode("utf-8")  # strict: invalid UTF-8 must not get out either
    found = sorted({f"U+{ord(c):04X}" for c in text if c != "\n" and is_unsafe(c)})
    assert not found, f"{what}: raw {found} in {text!r}"
    if lines is not None:
        assert text.count("\n") == lines and (not text or text.endswith("\n")), f"{what}: not {lines} line(s): {text!r}"


def names_checkpoint(path):
    """A real torch.save file whose state-dict keys are HOSTILE_NAMES and PLAIN_NAMES, plus a non-tensor item
    with a hostile key (so notes or groups may name it). Returns {name: tensor}."""
    import torch

    g = torch.Generator().manual_seed(16)
    sd = {n: torch.randn(2, 3, generator=g) for n in HOSTILE_NAMES + PLAIN_NAMES}
    torch.save({**sd, "step\x1b[2K\rOK": 5}, path)
    return sd


def colliding_names(path):
    """A real torch.save file where a nested key and a dotted key give the same hostile name: a tensor error
    that names it."""
    import torch

    torch.save({HOSTILE_NAMES[0]: {"b": torch.ones(2)}, HOSTILE_NAMES[0] + ".b": torch.zeros(2)}, path)


def _rezip(src, dst, edit):
    """Copies the torch.save zip `src` to `dst` entry by entry (stored, as torch writes), `edit(name, data)`
    returning a list of (name, data) to write instead."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(zipfile.ZipInfo(name), data)


def _one_tensor(path):
    import torch

    torch.save({"w": torch.ones(2)}, path)


def edited_zips(folder):
    """Hand-edited torch.save zips that carry PAYLOAD into an error message, each from a real torch.save:
    {file: (what was edited, the error kind ckptconv gives, or None: it converts)}."""
    import warnings

    base = folder / "base.pt"
    _one_tensor(base)
    payload = PAYLOAD.encode()
    key = b"0" + payload
    cases = {
        # the archive/byteorder entry's text, quoted in "byte order '...'"
        "byteorder.pt": ("byteorder", "unsupported",
                         lambda n, d: [(n, payload if n.endswith("/byteorder") else d)]),
        # the storage type global (GLOBAL torch\nFloatStorage): not a storage class on the allowlist, so the
        # refusal names it ("... used as a storage type")
        "global_name.pt": ("global name", "unsafe-global",
                           lambda n, d: [(n, d.replace(b"ctorch\nFloatStorage\n", b"ctorch\n" + payload + b"Storage\n")
                                          if n.endswith("data.pkl") else d)]),
        # the storage key: BINUNICODE '0' -> '0' + payload; the entry archive/data/<key> is then missing
        "storage_key.pt": ("storage key", "tensor",
                           lambda n, d: [(n, d.replace(b"X\x01\x00\x00\x000", b"X" + len(key).to_bytes(4, "little") + key)
                                          if n.endswith("data.pkl") else d)]),
        # the archive's root folder, which inspect shows in the format line ("archive '...'"); not an error
        "archive_root.pt": ("archive root", None,
                            lambda n, d: [(PAYLOAD + n[n.index("/"):], d)]),
        # a zip entry name, written twice: "entry '...' appears twice"
        "zip_entry_name.pt": ("zip entry name", "zip",
                              lambda n, d: [(n, d)] + ([(f"archive/{PAYLOAD}", b"x")] * 2 if n.endswith("version") and "." not in n else [])),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        for file, (what, kind, edit) in cases.items():
            _rezip(base, folder / file, edit)
            out[folder / file] = (what, kind)
    return out
