"""Inventory of the pickle globals that real checkpoint files use, and how each is used.

Owns: tests/security/globals_inventory.py. Reads files only: it never unpickles anything. Every pickle is walked with
pickletools.genops and a small symbolic stack (strings, globals, tuples, marks, memo), so each GLOBAL / STACK_GLOBAL
name is attributed to what the pickle does with it:

  REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ   the global is called (the callable / class of the opcode)
  BUILD_ON_GLOBAL                        BUILD whose target is the global itself (setattr on a module/class)
  BUILD_INSTANCE                         BUILD on an object that a call of the global returned (its __setstate__)
  PERSID                                 the global sits in a persistent id tuple (torch's storage type)
  REF                                    any other use: an argument, a dict value, a list item (referenced only)

Where the pickles are found:
  - zip containers (torch.save archives, incl. several concatenated in one DCP .distcp file): every entry whose name
    ends in ".pkl" (data.pkl; other .pkl entries are reported too), archive by archive;
  - torch's legacy (non-zip) format: its five leading pickles (magic, protocol, sys_info, object, storage keys);
  - anything else (DCP .metadata, plain pickle.dump files): consecutive pickles from offset 0 to the end.
A file where none of these parses is listed as "not a pickle container" (e.g. safetensors, json).

Usage:  .venv/bin/python tests/security/globals_inventory.py [--json OUT.json] [--md OUT.md] PATH...
PATHs are files or folders (walked recursively, following symlinks, so a folder of links to several fixture roots
works; files ending in .json/.safetensors/.txt/.py/... skipped).
"""

import argparse
import collections
import io
import json
import os
import pickletools
import struct
import sys
from pathlib import Path

CALL_KINDS = ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "BUILD_ON_GLOBAL")
OTHER_KINDS = ("BUILD_INSTANCE", "PERSID", "REF")
SKIP_SUFFIXES = {".json", ".safetensors", ".txt", ".py", ".yaml", ".yml", ".jinja", ".md", ".gitignore", ".model",
                 ".pyc", ".log", ".sh"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Mark:
    pass


class Str:
    def __init__(self, v):
        self.v = v


class Glob:
    def __init__(self, name):
        self.name = name


class Tup:
    def __init__(self, items):
        self.items = items


class Made:
    """An object returned by calling a global."""
    def __init__(self, glob):
        self.glob = glob


class Other:
    pass


OTHER = Other()
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
KEEP_TARGET = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}


def walk_pickle(data, uses, where):
    """Walk one pickle starting at data[0]; add (global, kind) -> count into uses; return the bytes consumed."""
    stack, memo = [], {}
    end = None

    def pop():
        if not stack:
            raise ValueError("stack underflow")
        return stack.pop()

    def pop_mark():
        items = []
        while True:
            x = pop()
            if isinstance(x, Mark):
                return items[::-1]
            items.append(x)

    def ref(x, kind="REF"):
        # a value consumed by an opcode: a global in it (even inside tuples) is referenced
        if isinstance(x, Glob):
            uses[(x.name, kind)] += 1
            where.setdefault(x.name, set())
        elif isinstance(x, Tup):
            for y in x.items:
                ref(y, kind)

    def call(target, kind):
        if isinstance(target, Glob):
            uses[(target.name, kind)] += 1
            return Made(target.name)
        return OTHER

    for op, arg, pos in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            mod, _, attr = arg.partition(" ")
            g = Glob(f"{mod}.{attr}")
            where.setdefault(g.name, set())
            if name == "GLOBAL":
                stack.append(g)
            else:
                for x in pop_mark():
                    ref(x)
                stack.append(call(g, "INST"))
        elif name == "STACK_GLOBAL":
            attr, mod = pop(), pop()
            if not (isinstance(attr, Str) and isinstance(mod, Str)):
                raise ValueError(f"STACK_GLOBAL on non-strings at {pos}")
            g = Glob(f"{mod.v}.{attr.v}")
            where.setdefault(g.name, set())
            stack.append(g)
        elif name in STRING_OPS:
            stack.append(Str(arg if isinstance(arg, str) else repr(arg)))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "REDUCE":
            args, f = pop(), pop()
            ref(args)
            stack.append(call(f, "REDUCE"))
        elif name == "NEWOBJ":
            args, cls = pop(), pop()
            ref(args)
            stack.append(call(cls, "NEWOBJ"))
        elif name == "NEWOBJ_EX":
            kw, args, cls = pop(), pop(), pop()
            ref(args), ref(kw)
            stack.append(call(cls, "NEWOBJ_EX"))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise ValueError(f"OBJ without class at {pos}")
            for x in items[1:]:
                ref(x)
            stack.append(call(items[0], "OBJ"))
        elif name == "BUILD":
            state = pop()
            ref(state)
            target = stack[-1] if stack else None
            if isinstance(target, Glob):
                uses[(target.name, "BUILD_ON_GLOBAL")] += 1
            elif isinstance(target, Made):
                uses[(target.glob, "BUILD_INSTANCE")] += 1
        elif name == "BINPERSID":
            ref(pop(), "PERSID")
            stack.append(OTHER)
        elif name == "TUPLE":
            stack.append(Tup(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [pop() for _ in range(n)][::-1]
            stack.append(Tup(items))
        elif name == "EMPTY_TUPLE":
            stack.append(Tup([]))
        elif name in ("EXT1", "EXT2", "EXT4"):
            uses[(f"<extension {arg}>", "REF")] += 1
            stack.append(OTHER)
        elif name in KEEP_TARGET:
            if name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                for x in pop_mark():
                    ref(x)
            else:
                for _ in range(1 if name == "APPEND" else 2):
                    ref(pop())
        elif name == "STOP":
            ref(pop())
            end = pos + 1
            break
        elif name in ("PROTO", "FRAME"):
            pass
        else:
            before, after = op.stack_before, op.stack_after
            if pickletools.stackslice in before:
                for x in pop_mark():
                    ref(x)
                rest = len(before) - 2
            else:
                rest = len(before)
            for _ in range(rest):
                ref(pop())
            for s in after:
                stack.append(Mark() if s is pickletools.markobject else OTHER)
    if end is None:
        raise ValueError("no STOP")
    return end


def zip_pickles(data):
    """(entry name, bytes) of every .pkl entry of every zip archive in data, including several archives concatenated
    in one file (DCP .distcp): each end-of-central-directory record is opened with zipfile on the bytes up to it, and
    zipfile places its archive by the central directory's own offsets (torch writes sizes in data descriptors, so
    local headers alone do not give them)."""
    import zipfile
    out, i, seen = [], 0, set()
    while True:
        i = data.find(b"PK\x05\x06", i)
        if i < 0:
            return out
        if i + 22 <= len(data):
            (clen,) = struct.unpack_from("<H", data, i + 20)
            try:
                z = zipfile.ZipFile(io.BytesIO(data[:i + 22 + clen]))
                for info in z.infolist():
                    if info.filename.endswith(".pkl"):
                        key = (info.header_offset, info.filename)
                        if key not in seen:
                            seen.add(key)
                            out.append((info.filename, z.read(info)))
            except (zipfile.BadZipFile, ValueError, struct.error):
                pass
        i += 4


def file_pickles(path):
    """(label, bytes) of every pickle of a file, or None if it is not a pickle container."""
    data = Path(path).read_bytes()
    if data[:4] == b"PK\x03\x04":
        return [(f"zip:{n}", b) for n, b in zip_pickles(data)]
    pickles, off = [], 0
    try:
        while off < len(data):
            n = walk_pickle(data[off:], collections.Counter(), {})
            pickles.append((f"@{off}", data[off:off + n]))
            if len(pickles) == 1 and _is_legacy_magic(data[off:off + n]):
                # torch legacy: magic, protocol, sys_info, object, storage keys; raw storages follow
                for _ in range(4):
                    off += n
                    n = walk_pickle(data[off:], collections.Counter(), {})
                    pickles.append((f"@{off}", data[off:off + n]))
                return pickles
            off += n
    except Exception:
        if not pickles:
            return None
    return pickles


def _is_legacy_magic(p):
    try:
        import pickle
        # the first pickle of a legacy torch file is a bare int: safe to load with a restricted unpickler
        class NoGlobals(pickle.Unpickler):
            def find_class(self, m, n):
                raise pickle.UnpicklingError("global")
        return NoGlobals(io.BytesIO(p)).load() == LEGACY_MAGIC
    except Exception:
        return False


def iter_files(paths):
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=True):
                dirs.sort()
                for f in sorted(files):
                    q = Path(root) / f
                    if q.suffix.lower() not in SKIP_SUFFIXES and q.name != ".gitignore":
                        yield q
        elif p.is_file():
            yield p


def inventory(paths, base=None):
    uses = collections.Counter()            # (global, kind) -> count
    files_of = collections.defaultdict(set)  # global -> files
    kinds_of_file = collections.defaultdict(set)
    scanned, skipped, errors = [], [], []
    for f in iter_files(paths):
        shown = os.path.relpath(f, base) if base else str(f)
        try:
            pickles = file_pickles(f)
        except Exception as e:  # noqa: BLE001
            errors.append((shown, str(e)))
            continue
        if not pickles:
            skipped.append(shown)
            continue
        scanned.append((shown, len(pickles)))
        for label, b in pickles:
            local, where = collections.Counter(), {}
            try:
                walk_pickle(b, local, where)
            except Exception as e:  # noqa: BLE001
                errors.append((f"{shown} {label}", str(e)))
                continue
            uses.update(local)
            for g in where:
                files_of[g].add(shown)
            for (g, k) in local:
                kinds_of_file[(g, k)].add(shown)
    return uses, files_of, kinds_of_file, scanned, skipped, errors


def summarize(uses, files_of, kinds_of_file):
    rows = []
    for g in sorted(files_of):
        counts = {k: uses.get((g, k), 0) for k in CALL_KINDS + OTHER_KINDS}
        called = any(counts[k] for k in CALL_KINDS)
        example = sorted(files_of[g])[0]
        for k in CALL_KINDS:  # prefer an example where it is called
            if counts[k]:
                example = sorted(kinds_of_file[(g, k)])[0]
                break
        rows.append({"global": g, "called": called, "counts": {k: v for k, v in counts.items() if v},
                     "files": len(files_of[g]), "example": example})
    return rows


def to_markdown(rows, scanned, skipped, errors):
    out = ["| global | called? | uses (kind: count) | files | example file |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (not r["called"], r["global"])):
        uses = ", ".join(f"{k}: {v}" for k, v in r["counts"].items())
        out.append(f"| `{r['global']}` | {'**called**' if r['called'] else 'referenced only'} | {uses} | "
                   f"{r['files']} | `{r['example']}` |")
    called = [r["global"] for r in rows if r["called"]]
    out.append("")
    out.append(f"Called ({len(called)}): " + ", ".join(f"`{g}`" for g in called))
    out.append("")
    out.append(f"{len(scanned)} files scanned ({sum(n for _, n in scanned)} pickles), "
               f"{len(skipped)} not pickle containers, {len(errors)} errors.")
    for e in errors:
        out.append(f"- error: `{e[0]}`: {e[1]}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--base", help="show file paths relative to this folder")
    ap.add_argument("--files", action="store_true", help="also list every scanned file")
    a = ap.parse_args()
    uses, files_of, kinds_of_file, scanned, skipped, errors = inventory(a.paths, a.base)
    rows = summarize(uses, files_of, kinds_of_file)
    md = to_markdown(rows, scanned, skipped, errors)
    if a.files:
        md += "\nScanned:\n" + "".join(f"- `{f}` ({n} pickles)\n" for f, n in scanned)
    if a.md:
        Path(a.md).write_text(md)
    else:
        sys.stdout.write(md)
    if a.json:
        Path(a.json).write_text(json.dumps({"globals": rows, "scanned": scanned, "skipped": skipped,
                                            "errors": errors}, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
