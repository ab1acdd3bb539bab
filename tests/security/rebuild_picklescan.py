"""Rebuilds, with our own opcodes, every file picklescan 1.0.5's tests assert on that picklescan 0.0.32's data
writers do not produce (tests/security/fetch_corpora.py runs those first).

Owns: tests/security/rebuild_picklescan.py. Its test_scanner.py (from the pinned 1.0.5 sdist) is parsed, not
imported: each `assert_scan("NAME", [Global(module, name, level), ...])` and
`compare_scan_results(scan_file_path(f"{_root_path}/data[2]/NAME"), <ScanResult literal or a name bound to one>)`
gives a file and the globals picklescan must find in it. Our file calls each of those globals in turn (REDUCE of a
STACK_GLOBAL, so dotted names like `GuardBuilder.get` are written as pickle writes them), in the container the name
says (.zip: a zip with data.pkl, with the general-purpose flag bits its name gives; pytorch_magic_bypass.pt: a legacy
torch.save layout whose magic number comes from eval; malicious6.pkl: two stacked pickles). picklescan 1.0.5 must then
report exactly the expected globals for it (checked here, so a rebuilt file that drifts from the test fails the build).
Benign files (real torch models) are not rebuilt: the repo's own fixtures cover real checkpoints.
"""

import ast
import io
import pickle
import struct
import zipfile

from ops import call, glob, s, seq, sglob, whole

ARG = "__import__('os').system('id')"  # a payload string; these files are never loaded


def expectations(src):
    """{'data/NAME' or 'data2/NAME': [(module, name, level)]} from 1.0.5's test_scanner.py."""
    tree = ast.parse(src)

    def globals_of(node, bound):
        if isinstance(node, ast.Name):
            node = bound.get(node.id)
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ScanResult"):
            return None
        lst = node.args[0] if node.args else next(k.value for k in node.keywords if k.arg == "globals")
        if not isinstance(lst, ast.List):
            return None
        out = []
        for g in lst.elts:
            value = lambda a: a.value if isinstance(a, ast.Constant) else a.attr  # "x" or SafetyLevel.X
            v = dict(zip(("module", "name", "safety"), map(value, g.args)))
            v.update({k.arg: value(k.value) for k in g.keywords})
            out.append((v["module"], v["name"], v["safety"]))
        return out

    found = {}
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        bound = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                bound[node.targets[0].id] = node.value
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None)
            if name == "assert_scan" and isinstance(node.args[0], ast.Constant):
                g = globals_of(ast.Call(func=ast.Name("ScanResult"), args=[node.args[1]], keywords=[]), bound)
                found[f"data2/{node.args[0].value}"] = g
            elif name == "compare_scan_results" and isinstance(node.args[0], ast.Call) and \
                    getattr(node.args[0].func, "id", None) == "scan_file_path":
                path = node.args[0].args[0]
                if isinstance(path, ast.JoinedStr):
                    tail = "".join(v.value for v in path.values if isinstance(v, ast.Constant)).lstrip("/")
                    g = globals_of(node.args[1], bound)
                    if g is not None:
                        found[tail] = g
    return found


def calls(gl, proto=4):
    """A pickle calling each (module, name) in turn; the last call's result is the pickle's."""
    get = sglob if proto >= 4 else glob
    return whole(seq(*[call(get(m, n), s(ARG)) for m, n, _ in gl]), proto)


def zip_with_flags(pkl, flag):
    """A zip holding data.pkl whose general-purpose flag word has `flag` set (local and central headers)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", pkl)
    data = bytearray(buf.getvalue())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        (old,) = struct.unpack_from("<H", data, at + off)
        struct.pack_into("<H", data, at + off, old | flag)
    return bytes(data)


def magic_bypass(gl):
    """torch.save's legacy layout (magic number, protocol, sys info, object pickles) with the magic number computed
    by __builtin__.eval, and the object pickle calling the other globals."""
    (em, en, _), rest = gl[0], gl[1:]
    magic = whole(call(glob(em, en), s("0x1950A86A20F9469CFC6C")), 2)
    proto = pickle.dumps(1001, protocol=2)
    info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    obj = whole(seq(*[call(glob(m, n), s("touch /tmp/pwned")) for m, n, _ in rest]), 2)
    return magic + proto + info + obj + pickle.dumps([], protocol=2)


def npy_object_array(gl):
    """np.save of a one-element object array whose element pickles as a call of the last (dangerous) global."""
    import importlib

    import numpy as np

    module, name, _ = gl[-1]
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)

    class Payload:
        def __reduce__(self):
            return fn, (("pwned.invalid", 443),)

    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    return buf.getvalue()


BENIGN = {"data/pytorch_model.bin", "data/new_pytorch_model.bin", "data/benign0_v3.pkl"}


def build(src, out, have):
    """Writes into `out` every expected file not in `have`; returns ({rel: origin}, [skipped])."""
    from picklescan.scanner import scan_file_path

    exp = expectations(src)
    got, skipped = {}, []
    for rel, gl in sorted(exp.items()):
        if rel in have:
            continue
        if rel in BENIGN:
            skipped.append({"what": rel, "why": "a benign real torch model (picklescan's repository binary); "
                                                "real checkpoints are the repo's own fixtures"})
            continue
        if not gl:
            skipped.append({"what": rel, "why": "picklescan's test expects no global in it (not a pickle)"})
            continue
        name = rel.rsplit("/", 1)[1]
        if name.endswith(".7z"):
            skipped.append({"what": rel, "why": "a 7z archive: py7zr is not installed (no 7z writer); ckptconv reads no 7z"})
            continue
        if name.endswith(".npy"):
            data, how = npy_object_array(gl), "np.save of an object array whose element's __reduce__ gives"
        elif name.startswith("malicious1_0x"):
            flag = int(name.split("_0x")[1].split(".")[0], 16)
            data, how = zip_with_flags(calls(gl), flag), f"zip, data.pkl with flag bits 0x{flag:x}"
        elif name == "pytorch_magic_bypass.pt":
            data, how = magic_bypass(gl), "legacy torch.save layout, magic number from eval"
        elif name == "malicious6.pkl":
            data, how = pickle.dumps(["a", "b", "c"]) + calls(gl), "a benign pickle, then a second one calling"
        elif name.endswith(".zip"):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("data.pkl", calls(gl))
            data, how = buf.getvalue(), "zip, data.pkl calling"
        else:
            data, how = calls(gl), "pickle calling"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # picklescan must see in our file exactly what its own test expects in the original.
        seen = sorted((g.module, g.name, g.safety.name) for g in scan_file_path(str(path)).globals)
        want = sorted(gl)
        if seen != want:
            raise SystemExit(f"rebuild_picklescan: {rel}: picklescan reports {seen}, its test expects {want}")
        got[rel] = f"picklescan 1.0.5 tests/test_scanner.py expects {', '.join(f'{m}.{n}' for m, n, _ in gl)}: {how} them"
    return got, skipped

