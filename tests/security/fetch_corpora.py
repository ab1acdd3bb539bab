"""Fetches and builds the public malicious-pickle corpora of issue #16 into tests/security/.corpora/ (git-ignored;
the downloaded sdists stay in tests/security/.corpora-sdists/).

Owns: tests/security/fetch_corpora.py (with rebuild_picklescan.py, rebuild_fickling.py and rebuild_modelscan.py).
Called by scripts/setup.sh and by the tests' setup (tests/e2e/test_pickle_policy.py, wasi/test_wasi_pickle_policy.py,
web/test/policy.test.mjs through tests/security/policy_cases.py); idempotent: when .corpora/manifest.json carries the
stamp of these scripts and pins it returns at once, else it rebuilds everything in a fresh folder and swaps it in.
Only PyPI is used (GitHub is not reachable from here nor from CI). Every file is data: nothing here unpickles one.

  picklescan/   picklescan's own test data. picklescan 1.0.5 (the version installed from tests/requirements.txt, the
                tests' oracle) ships tests/test_scanner.py in its sdist but no data and no longer writes any: its
                data/ and data2/ files are committed binaries of its repository. picklescan 0.0.32 is the last release
                whose test_scanner.py writes its data (initialize_pickle_files, initialize_numpy_files, and the
                Malicious* classes and reduce_GHSA_* functions they pickle). So: `pip download --no-deps
                --no-binary :all: picklescan==0.0.32` (sha256-pinned), then those initializers' bodies are run
                statement by statement into picklescan/data{,2}/ (read first: they only pickle.dump objects whose
                __reduce__ returns a tuple, or write literal bytes; nothing is called, nothing downloads). A statement
                that fails (a package missing here, a module gone from torch) is skipped and listed with its error.
  picklescan-1.0.5/  every other file picklescan 1.0.5's tests assert on (its test_scanner.py from the pinned 1.0.5
                sdist is parsed for assert_scan / compare_scan_results(scan_file_path(...)) calls), rebuilt by our
                code (rebuild_picklescan.py) from the globals the test expects, so that picklescan 1.0.5 reports
                exactly those globals for our file (checked here when building).
  fickling/     the kinds of pickles fickling 0.1.12's test-suite builds (its sdist has no tests: facts read from
                trailofbits/fickling test/ at tag v0.1.12), built with fickling's public API (rebuild_fickling.py):
                fickling.pytorch injections into a real torch.save file, Pickled.insert_python_* and
                insert_function_call_on_unpickled_object, a pickle/torch-zip polyglot, and the bypass pickles of
                test_bypasses.py / test_crashes.py written with fickling.fickle's opcode classes.
  modelscan/    modelscan's sdist has no test data; its tests (protectai/modelscan tests/test_modelscan.py and
                tests/test_utils.py at commit 8b8ed4b, v0.8.x) build their malicious pickles at run time with
                dill/tensorflow/aiohttp/requests. The same kinds are rebuilt by our own code (rebuild_modelscan.py):
                os.system / exec / eval / runpy._run_code injected before the data (their PickleInject), into
                plain pickles, a torch.save zip and a legacy torch.save file, and the file_path fixture's pickles
                (httplib, requests.api.get, aiohttp, socket, subprocess, sys.exit, bdb, webbrowser.open, ...).

manifest.json lists every file with where it comes from and, when it is not a pickle container ckptconv reads, the
documented refusal labels it may get instead of unsafe-global (`labels`) and picklescan findings that are not real
globals (`not_globals`); `skipped` lists what could not be built and why.

Run:  .venv/bin/python tests/security/fetch_corpora.py [--force]     (prints a summary)
"""

import argparse
import ast
import builtins
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".corpora"
SDISTS = {  # (version, sha256 of the sdist on PyPI)
    "0.0.32": "0c835af0a099db36a6ef39801fcf15d5e2c157b2af4bf0fea3d9e49b50d18f63",  # its tests write their data
    "1.0.5": "1e220fc0e7eb2021eeb59ee71ce22d6a889ffb9f4d86d6f8272b8defe83ab9dd",  # its tests' expectations
}
FICKLING_VERSION = "0.1.12"
PICKLESCAN_VERSION = "1.0.5"
SOURCES = ("fetch_corpora.py", "ops.py", "rebuild_picklescan.py", "rebuild_fickling.py", "rebuild_modelscan.py")

sys.path.insert(0, str(HERE))


def stamp():
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(json.dumps([SDISTS, FICKLING_VERSION, PICKLESCAN_VERSION, sys.version_info[:2]]).encode())
    return h.hexdigest()[:16]


# --- picklescan 0.0.32: its own data writers --------------------------------------------------------------------

def download_sdist(version, into):
    """The picklescan sdist from PyPI through pip, checked against its pinned sha256."""
    into.mkdir(parents=True, exist_ok=True)
    path = into / f"picklescan-{version}.tar.gz"
    if not path.exists():
        # pip prepares an sdist's metadata: with the venv's setuptools when it has one, else in an isolated build
        # environment (setuptools then comes from PyPI too).
        for isolation in (["--no-build-isolation"], []):
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                                *isolation, f"picklescan=={version}", "-d", str(into)], capture_output=True, text=True)
            if r.returncode == 0 and path.exists():
                break
        else:
            raise SystemExit(f"fetch_corpora: pip download picklescan=={version} failed (PyPI reachable?):\n{r.stderr}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDISTS[version]:
        raise SystemExit(f"fetch_corpora: {path} has sha256 {digest}, pinned {SDISTS[version]}")
    return path


def test_scanner_source(sdist):
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_scanner.py"))
        return tar.extractfile(member).read().decode()


# Statements of the initializers we do not run, with the reason.
DENY = [("linecache", "its DNSLogPayload.__reduce__ reads /etc/passwd while pickling (local data into a test file)")]


def files_under(root):
    return {p for p in root.rglob("*") if p.is_file()}


def run_picklescan_initializers(src, out, log):
    """Runs initialize_pickle_files' and initialize_numpy_files' bodies statement by statement with _root_path = out.
    Returns ({relative path: origin}, [skipped])."""
    tree = ast.parse(src)
    ns = {"__name__": "picklescan_test_data", "__builtins__": builtins, "__file__": str(out / "test_scanner.py")}
    skipped, defs = [], {}
    for node in tree.body:
        keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef)) or (
            isinstance(node, ast.FunctionDef) and not node.name.startswith("test_")) or (
            isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets))
        # Not kept: the HTTPS mock and its monkey-patch of http.client, the module-level initializer calls, tests.
        if isinstance(node, ast.ClassDef) and not node.name.startswith("Malicious"):
            keep = False
        if not keep:
            continue
        if isinstance(node, ast.FunctionDef):
            defs[node.name] = node
        try:
            exec(compile(ast.Module([node], []), "picklescan-0.0.32/tests/test_scanner.py", "exec"), ns)
        except Exception as e:  # a package this machine lacks: whatever uses it is skipped below, with its error
            log(f"  picklescan 0.0.32: line {node.lineno}: {type(e).__name__}: {e}")
    ns["_root_path"] = str(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data2").mkdir(parents=True, exist_ok=True)
    origins = {}
    for fname in ("initialize_pickle_files", "initialize_numpy_files"):
        for stmt in defs[fname].body:
            text = ast.get_source_segment(src, stmt)
            what = f"{fname} line {stmt.lineno}: {text.splitlines()[0].strip()}"
            denied = [why for needle, why in DENY if needle in text]
            if denied:
                skipped.append({"what": what, "why": denied[0]})
                continue
            before = files_under(out)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    exec(compile(ast.Module([stmt], []), "picklescan-0.0.32/tests/test_scanner.py", "exec"), ns)
            except Exception as e:
                for p in files_under(out) - before:  # a half-written file is not the corpus's
                    p.unlink()
                skipped.append({"what": what, "why": f"{type(e).__name__}: {e}"})
                continue
            for p in sorted(files_under(out) - before):
                origins[p.relative_to(out).as_posix()] = what
    return origins, skipped


# --- the manifest ------------------------------------------------------------------------------------------------

# Files that are not a pickle container ckptconv reads, and the clear refusal each may get instead (ckptconv's labels
# as in tests/hostile/corpus.py), with the reason. Matched on the file's path under .corpora/.
NOT_CONTAINERS = {
    "picklescan/data/bad_pytorch.pt": (["not-checkpoint"], "a PNG signature with a .pt name: no pickle at all"),
    "picklescan/data/malicious1_wrong_ext.zip": (
        ["not-checkpoint", "zip"], "a zip whose only entry is data.txt: no data.pkl, no torch checkpoint (torch.load "
        "refuses it too, so the pickle inside is never run)"),
}
for _v in (0, 3, 4):
    NOT_CONTAINERS[f"picklescan/data/benign0_v{_v}.pkl"] = (
        ["no-tensors", "not-checkpoint"], "picklescan's benign ['a', 'b', 'c']: no global, no tensor")
# picklescan/data/malicious6.pkl is built only where `requests` is installed (Ray brings it: the scale-out tests).
for _p in ("picklescan-1.0.5/data/malicious6.pkl", "modelscan/malicious6_stacked.pkl",
           "picklescan/data/malicious6.pkl"):
    NOT_CONTAINERS[_p] = (
        ["unsafe-global", "pickle"], "a benign pickle, then a second pickle calling requests.get: torch.load stops at "
        "the first (not a magic number) and pickle.load never reads the second, so data after STOP may be refused as "
        "such (issue #16's differentials) instead of naming the global")
for _p in ("picklescan/data/malicious1_central_directory.zip", "picklescan/data2/malicious1_crc.zip",
           "picklescan-1.0.5/data/malicious1_0x1.zip", "picklescan-1.0.5/data/malicious1_0x20.zip",
           "picklescan-1.0.5/data/malicious1_0x40.zip"):
    NOT_CONTAINERS[_p] = (
        ["unsafe-global", "zip", "unsupported"], "a zip damaged on purpose (local and central names differ, a wrong "
        "CRC, or the encrypted / patched-data / strong-encryption flag bits set): a reader may refuse the entry itself "
        "(an encrypted entry as unsupported)")
NOT_CONTAINERS["picklescan/data/broken_model.pkl"] = (
    ["unsafe-global", "truncated"], "GLOBAL builtins.exec, then a BINUNICODE whose length runs past the end: Python's "
    "unpickler stops there too, before any call, so it may be refused as cut short (the message still names the "
    "global, checked in test_refused)")
for _p in ("picklescan/data/malicious1.zip", "modelscan/test_zip_data_pkl_eval.zip"):
    NOT_CONTAINERS[_p] = (
        ["unsafe-global", "zip"], "a zip whose data.pkl is not in a folder: torch.load refuses such an archive too "
        "(\"file in archive is not in a subdirectory\"), so nothing in it runs, and ckptconv may refuse it as torch "
        "does")
SUFFIX_LABELS = {
    ".npy": (["not-checkpoint"], "a NumPy .npy file (its pickle sits behind the NPY header): not a torch checkpoint"),
    ".npz": (["not-checkpoint", "zip", "unsupported"], "a NumPy .npz (a zip of .npy files, no data.pkl): not a torch "
             "checkpoint (its compressed variant may be refused for its deflate entries first)"),
}
# picklescan findings that are no global a pickle could import (its notation for an unresolved STACK_GLOBAL).
NOT_GLOBALS = {"unknown.os": "picklescan's name for a STACK_GLOBAL whose module string comes from a missing memo key"}


def entry(rel, source, origin, labels=None, why=None, names=None):
    e = {"path": rel, "source": source, "origin": origin}
    if names:
        e["names"] = names  # globals the file calls, which ckptconv must name besides picklescan's findings
    for suffix, (lab, reason) in SUFFIX_LABELS.items():
        if rel.endswith(suffix) and labels is None:
            labels, why = lab, reason
    if rel in NOT_CONTAINERS:
        labels, why = NOT_CONTAINERS[rel]
    if labels is not None:
        e["labels"], e["labels_why"] = labels, why
    return e


def check_pickles(path):
    """The file is one or more complete pickles, nothing else (parsed with pickletools, never loaded)."""
    import pickletools

    data = path.read_bytes()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for _ in pickletools.genops(stream):
                pass
        except Exception as e:
            raise SystemExit(f"fetch_corpora: {path} is not a well-formed pickle at byte {stream.tell()}: {e}")


def build(root, log):
    """Everything into root (empty); returns the manifest."""
    import rebuild_fickling
    import rebuild_modelscan
    import rebuild_picklescan

    files, skipped = [], []
    sdists = CACHE.parent / ".corpora-sdists"  # kept across rebuilds: pinned by sha256
    old = download_sdist("0.0.32", sdists)
    new = download_sdist("1.0.5", sdists)

    out = root / "picklescan"
    log("picklescan 0.0.32: running its test data writers")
    origins, sk = run_picklescan_initializers(test_scanner_source(old), out, log)
    skipped += [dict(s, source="picklescan-0.0.32") for s in sk]
    files += [entry(f"picklescan/{rel}", "picklescan-0.0.32", o) for rel, o in sorted(origins.items())]

    log("picklescan 1.0.5: rebuilding the other files its tests assert on")
    got, sk = rebuild_picklescan.build(test_scanner_source(new), root / "picklescan-1.0.5",
                                       have={rel for rel in origins})
    skipped += [dict(s, source="picklescan-1.0.5") for s in sk]
    files += [entry(f"picklescan-1.0.5/{rel}", "picklescan-1.0.5 (rebuilt)", o) for rel, o in sorted(got.items())]

    log("fickling: building the kinds of its test-suite with its API")
    got, sk = rebuild_fickling.build(root / "fickling")
    skipped += [dict(s, source=f"fickling-{FICKLING_VERSION}") for s in sk]
    files += [entry(f"fickling/{rel}", f"fickling-{FICKLING_VERSION}", o, *extra) for rel, (o, *extra) in sorted(got.items())]

    log("modelscan: rebuilding the kinds of its tests")
    got, sk = rebuild_modelscan.build(root / "modelscan")
    skipped += [dict(s, source="modelscan") for s in sk]
    files += [entry(f"modelscan/{rel}", "modelscan (rebuilt)", o, *extra) for rel, (o, *extra) in sorted(got.items())]

    for f in files:  # what we wrote must be well-formed pickles (a broken one would test nothing)
        if f["source"] != "picklescan-0.0.32" and f["path"].endswith((".pkl", ".pickle")):
            check_pickles(root / f["path"])
        data = (root / f["path"]).read_bytes()
        for name in f.get("names", []):  # a recorded global is spelled in the file (module and name strings)
            parts = name.split(".")
            if not any(".".join(parts[:k]).encode() in data and ".".join(parts[k:]).encode() in data
                       for k in range(1, len(parts))):
                raise SystemExit(f"fetch_corpora: {f['path']}: recorded global {name} is not spelled in the file")
    return {"stamp": stamp(), "picklescan": PICKLESCAN_VERSION, "fickling": FICKLING_VERSION, "files": files,
            "skipped": skipped, "not_globals": NOT_GLOBALS}


def cached():
    """The manifest when the cache is current, else None."""
    path = CACHE / "manifest.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    if m.get("stamp") != stamp() or not all((CACHE / f["path"]).exists() for f in m["files"]):
        return None
    return m


def ensure():
    """The manifest of the cached corpora, building them first (in a separate Python, so that the writers' imports
    and pickling stay out of the caller's process) when missing or stale."""
    m = cached()
    if m is None:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--quiet"], capture_output=True, text=True)
        m = cached()
        if r.returncode != 0 or m is None:
            raise RuntimeError(f"tests/security/fetch_corpora.py failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return m


def rebuild(force=False, log=lambda m: print(m, file=sys.stderr)):
    """Builds the cache unless current (or force); one builder at a time."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / ".corpora.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        m = None if force else cached()
        if m is not None:
            return m
        tmp = CACHE.parent / f".corpora.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cwd = os.getcwd()
        try:
            os.chdir(tmp)  # some writers (fickling's polyglot helpers) use the working folder
            with contextlib.redirect_stdout(io.StringIO()):
                m = build(tmp, log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.chdir(cwd)
        (tmp / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
        shutil.rmtree(CACHE, ignore_errors=True)
        os.replace(tmp, CACHE)
        return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    ap.add_argument("--quiet", action="store_true", help="print nothing but errors")
    a = ap.parse_args()
    m = rebuild(force=a.force, log=(lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr)))
    if a.quiet:
        return
    by = {}
    for f in m["files"]:
        by[f["source"]] = by.get(f["source"], 0) + 1
    print(f"{len(m['files'])} corpus files in {CACHE}: " + ", ".join(f"{k} {v}" for k, v in sorted(by.items())))
    for s in m["skipped"]:
        print(f"skipped [{s['source']}] {s['what']}: {s['why']}")


if __name__ == "__main__":
    main()
