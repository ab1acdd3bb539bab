"""Terminal-safe output (issue #16): names and bytes from a file never reach stdout or stderr raw.

Owns: tests/e2e/test_terminal.py. Real torch.save files (tests/hostile/terminal.py) hold 20 hostile tensor names
(ESC sequences, CR, LF, NUL, BEL, BS, VT, FF, DEL, C1 CSI and NEL, bidi overrides and isolates, zero-width
characters, BOM, tag characters, line separators) and hand-edited structures (byte order, storage type global,
storage key, zip entry name, archive root) that put an ESC[2K\\r payload into an error. Every run's raw stdout and
stderr bytes are checked: no control or format character but the newline ending each line, valid UTF-8, and
every file-derived string shown as its escape (`\\x1b`, `\\u{202e}`). `inspect --json` gives the exact names back.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hostile"))
import terminal  # noqa: E402
from terminal import HOSTILE_NAMES, PAYLOAD, PLAIN_NAMES, assert_terminal_safe, escaped  # noqa: E402

ERROR_LINE = re.compile(r"^ckptconv: error\[([a-z-]+)\]: ", re.M)


def run_bytes(binary, *args):
    return subprocess.run([binary, *map(str, args)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("terminal")
    names = d / f"in{PAYLOAD}.pt"  # the input's own file name is hostile too
    sd = terminal.names_checkpoint(names)
    terminal.colliding_names(d / "collide.pt")
    (d / f"junk{PAYLOAD}.pt").write_bytes(b"\x00not a checkpoint\x1b[2K\r")
    return {"dir": d, "names": names, "state": sd, "edited": terminal.edited_zips(d)}


def test_at_least_15_hostile_names():
    assert len(set(HOSTILE_NAMES)) >= 15
    assert all(any(terminal.is_unsafe(c) for c in n) for n in HOSTILE_NAMES)


def test_inspect_listing_escapes_every_name(binary, inputs):
    r = run_bytes(binary, "inspect", inputs["names"])
    assert r.returncode == 0, r.stderr
    n = len(inputs["state"])
    assert_terminal_safe(r.stdout, "inspect stdout", lines=7 + n)
    assert_terminal_safe(r.stderr, "inspect stderr", lines=0)
    text = r.stdout.decode()
    rows = text.splitlines()[-n:]
    for name in HOSTILE_NAMES + PLAIN_NAMES:
        want = escaped(name)
        assert any(row.startswith(want + " ") for row in rows), f"{name!r} not listed as {want!r}:\n{text}"
    for name in PLAIN_NAMES:  # legitimate names, ASCII or not, are unchanged
        assert escaped(name) == name and name in text
    assert text.splitlines()[0] == f"input:   {escaped(str(inputs['names']))}"


def test_inspect_json_is_exact_and_printable(binary, inputs):
    r = run_bytes(binary, "inspect", "--json", inputs["names"])
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout, "inspect --json stdout")  # JSON escapes every control itself
    doc = json.loads(r.stdout)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(inputs["state"])
    assert doc["input"] == str(inputs["names"])
    for name in PLAIN_NAMES:  # unescaped in the text, as before
        assert json.dumps(name, ensure_ascii=False).encode() in r.stdout


def test_convert_report_is_escaped_and_output_exact(binary, inputs, tmp_path):
    out = tmp_path / f"out{PAYLOAD}"
    r = run_bytes(binary, "convert", inputs["names"], out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout, "convert stdout", lines=0)
    assert_terminal_safe(r.stderr, "convert stderr", lines=3)
    assert escaped(PAYLOAD).encode() in r.stderr
    with safe_open(out / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(inputs["state"])
        for k, v in inputs["state"].items():
            assert f.get_tensor(k).equal(v)


def assert_one_error(r, what, kind=None):
    assert r.returncode == 1, f"{what}: exit {r.returncode}: {r.stderr!r}"
    assert_terminal_safe(r.stdout, f"{what} stdout", lines=0)
    assert_terminal_safe(r.stderr, f"{what} stderr", lines=1)
    got = ERROR_LINE.findall(r.stderr.decode())
    assert len(got) == 1 and (kind is None or got[0] == kind), f"{what}: {r.stderr!r}"
    return r.stderr.decode()


@pytest.mark.parametrize("edit", ["byteorder.pt", "global_name.pt", "storage_key.pt", "zip_entry_name.pt"])
@pytest.mark.parametrize("cmd", ["inspect", "convert"])
def test_edited_structure_error_is_escaped(binary, inputs, tmp_path, edit, cmd):
    path = inputs["dir"] / edit
    what, kind = inputs["edited"][path]
    args = ["inspect", path] if cmd == "inspect" else ["convert", path, tmp_path / "out"]
    line = assert_one_error(run_bytes(binary, *args), f"{what} ({cmd})", kind)
    assert escaped(PAYLOAD) in line, line


def test_archive_root_in_format_line(binary, inputs):
    r = run_bytes(binary, "inspect", inputs["dir"] / "archive_root.pt")
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout, "inspect stdout", lines=8)
    assert f"archive '{escaped(PAYLOAD)}/'" in r.stdout.decode()
    r = run_bytes(binary, "inspect", "--json", inputs["dir"] / "archive_root.pt")
    assert_terminal_safe(r.stdout, "inspect --json stdout")
    assert json.loads(r.stdout)["format"] == f"torch.save zip (archive '{PAYLOAD}/')"


def test_tensor_name_in_error(binary, inputs, tmp_path):
    line = assert_one_error(run_bytes(binary, "convert", inputs["dir"] / "collide.pt", tmp_path / "o"), "collision", "tensor")
    assert f"tensor '{escaped(HOSTILE_NAMES[0])}.b'" in line


def test_group_names_in_error(binary, inputs, tmp_path):
    line = assert_one_error(run_bytes(binary, "inspect", inputs["names"], "--prefix", "nope"), "--prefix", "no-tensors")
    for name in HOSTILE_NAMES:
        assert escaped(name) in line


def test_file_name_in_error(binary, inputs):
    line = assert_one_error(run_bytes(binary, "inspect", inputs["dir"] / f"junk{PAYLOAD}.pt"), "junk")
    assert f"junk{escaped(PAYLOAD)}.pt: " in line
