"""The kinds of malicious pickles modelscan's tests build, rebuilt by our own code.

Owns: tests/security/rebuild_modelscan.py (called by tests/security/fetch_corpora.py). modelscan's sdist ships no
test data and its tests build their pickles at run time with dill, tensorflow, requests and aiohttp (not installed
here). What they build was read from protectai/modelscan tests/test_utils.py and tests/test_modelscan.py at commit
8b8ed4b (v0.8.x); each kind is written here with our opcodes (tests/security/ops.py), none of their code:
  - PickleInject: a payload call (os.system, exec, eval, runpy._run_code) pickled before the user's object in the same
    pickle (their generate_unsafe_pickle_file), into a plain pickle, a torch.save zip and a legacy torch.save file
    (their generate_unsafe_pytorch_file / unsafe_zip_pytorch.pt) and a pickled NumPy array named .npy;
  - the file_path fixture's pickles: http.client.HTTPSConnection at protocol 0 (httplib), requests.api.get,
    aiohttp.client.ClientSession, socket.create_connection, subprocess.run, sys.exit, bdb.Bdb.run, INST exec,
    os.system through memo juggling with torch.LongStorage strings (malicious11/14), a nested pickle.loads
    (malicious12), GLOBAL builtins 'eval.__call__' (malicious13), a zip with data.pkl calling eval, and
    webbrowser.open (its settings' HIGH list). The dill variants are not rebuilt: dill is not installed, and dill
    pickles builtins.eval exactly as pickle does (the same kind as malicious1).
Payload strings are never run (these files are only read by the tests).

build(out) -> ({relative path: (origin, labels, labels_why, names)}, [skipped]).
"""

import io
import pickle
import zipfile

from ops import InjectingPickler, Raw, by, call, glob, s, seq, sglob, tup, whole

CMD = "cat ~/.aws/secrets"  # their payload text; never run


def payload(command, proto):
    """Their PickleInject payloads: (module, name) called with the malicious code (runpy's with an empty dict)."""
    get = sglob if proto >= 4 else glob
    module, name = {"system": ("posix", "system"), "exec": ("builtins", "exec"), "eval": ("builtins", "eval"),
                    "runpy": ("runpy", "_run_code")}[command]
    args = [s(CMD)] + ([pickle.EMPTY_DICT] if command == "runpy" else [])
    return call(get(module, name), *args), f"{module}.{name}"


def inject_module(command):
    """A pickle_module whose Pickler writes the payload before the object, as their PickleInject._Pickler does."""
    import types

    class P(InjectingPickler):
        def dump(self, obj):
            if self.proto >= 2:
                self.write(pickle.PROTO + bytes([self.proto]))
            if self.proto >= 4:
                self.framer.start_framing()
            self.save(Raw(payload(command, self.proto)[0]))
            self.save(obj)
            self.write(pickle.STOP)
            self.framer.end_framing()

    mod = types.ModuleType("modelscan_kind_inject")
    mod.Pickler = P
    mod.dump = lambda obj, f, protocol=2, **kw: pickle.dump(obj, f, protocol=protocol)  # torch's header pickles
    mod.Unpickler, mod.load = pickle.Unpickler, pickle.load
    return mod


def build(out):
    import numpy as np
    import torch

    out.mkdir(parents=True, exist_ok=True)
    got = {}

    def put(name, data, origin, names, labels=None, why=None):
        (out / name).write_bytes(data)
        got[name] = (origin, labels, why, sorted(names))

    safe = {"a": [1, 2, 3], "b": "c"}
    for command in ("system", "exec", "eval", "runpy"):
        buf = io.BytesIO()
        inject_module(command).Pickler(buf, 4).dump(safe)
        put(f"pickle_inject_{command}.pkl", buf.getvalue(), f"PickleInject: {command} payload before a dict, protocol 4",
            [payload(command, 4)[1]])

    model = torch.nn.Linear(3, 2)
    for fmt, zip_ in (("zip", True), ("legacy", False)):
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf, pickle_module=inject_module("system"), _use_new_zipfile_serialization=zip_)
        put(f"pytorch_{fmt}_inject_system.pt", buf.getvalue(),
            f"generate_unsafe_pytorch_file: torch.save ({fmt} format) of a state dict with PickleInject's os.system "
            f"payload before it", ["posix.system"])

    buf = io.BytesIO()
    inject_module("exec").Pickler(buf, 4).dump(np.array([[1, 2, 3], [4, 5, 6]]))
    put("unsafe_numpy.npy", buf.getvalue(), "numpy_file_path: a NumPy array pickled with an exec payload before it, "
        "named .npy (a pickle, not the NPY format)", ["builtins.exec"], labels=["unsafe-global"],
        why="a pickle despite its .npy name")

    text = lambda module, name, *args, proto=2: whole(call(glob(module, name), *args), proto)
    put("malicious3_httplib.pkl", b"c" + b"httplib\nHTTPSConnection\n" + tup(s("github.com")) + pickle.REDUCE + b".",
        "malicious3: http.client.HTTPSConnection pickled at protocol 0 (written httplib)", ["httplib.HTTPSConnection"])
    put("malicious4_requests.pkl", whole(call(sglob("requests.api", "get"), s("https://github.com")), 4),
        "malicious4: requests.get", ["requests.api.get"])
    put("malicious5_aiohttp.pkl", whole(call(sglob("aiohttp.client", "ClientSession")), 4),
        "malicious5: aiohttp.ClientSession()", ["aiohttp.client.ClientSession"])
    put("malicious6_stacked.pkl", pickle.dumps(["a", "b", "c"]) + whole(call(sglob("requests.api", "get"),
                                                                              s("https://github.com")), 4),
        "malicious6: a benign pickle followed by a second pickle calling requests.get", ["requests.api.get"])
    put("malicious7_socket.pkl", whole(call(sglob("socket", "create_connection"), tup(s("github.com"), pickle.BININT2
                                                                                       + (80).to_bytes(2, "little"))), 4),
        "malicious7: socket.create_connection", ["socket.create_connection"])
    put("malicious8_subprocess_run.pkl", whole(call(sglob("subprocess", "run"), pickle.MARK + s("ls") + s("-l")
                                                    + pickle.LIST), 4),
        "malicious8: subprocess.run", ["subprocess.run"])
    put("malicious9_sys_exit.pkl", text("sys", "exit", pickle.BININT1 + b"\0"), "malicious9: sys.exit(0)", ["sys.exit"])
    put("malicious10_inst_exec.pkl", b"(S'print(\"Injection running\")'\ni__builtin__\nexec\n.",
        "malicious10: INST __builtin__ exec at protocol 0", ["__builtin__.exec"])
    memo = b"".join([pickle.UNICODE + b"os\n", pickle.PUT + b"2\n", pickle.POP, pickle.UNICODE + b"system\n",
                     pickle.PUT + b"3\n", pickle.POP, pickle.UNICODE + b"torch\n", pickle.PUT + b"0\n", pickle.POP,
                     pickle.UNICODE + b"LongStorage\n", pickle.PUT + b"1\n", pickle.POP, pickle.GET + b"2\n",
                     pickle.GET + b"3\n", pickle.STACK_GLOBAL, pickle.MARK, pickle.UNICODE + b"cat flag.txt\n",
                     pickle.TUPLE, pickle.REDUCE, pickle.STOP])
    put("malicious14_memo_stack_global.pkl", memo, "malicious11/14: os.system through memo slots next to "
        "'torch' and 'LongStorage' strings, STACK_GLOBAL without a PROTO", ["os.system"])
    inner = whole(call(glob("os", "system"), s("echo pwned")), 5)
    put("malicious12_nested_pickle_loads.pkl",
        whole(seq(call(glob("pickle", "loads"), by(inner)), pickle.NONE), 5),
        "malicious12: pickle.loads of a nested pickle that calls os.system", ["pickle.loads"])
    put("malicious13_eval_call_attr.pkl", whole(call(glob("builtins", "eval.__call__"),
                                                     s('__import__("os").system("echo pwned!!!")')), 5),
        "malicious13: GLOBAL builtins 'eval.__call__' (a dotted name)", ["builtins.eval.__call__"])
    put("malicious15_bdb_run.pkl", whole(call(sglob("bdb", "Bdb.run"), call(sglob("bdb", "Bdb")),
                                              s('import os\nos.system("whoami")')), 4),
        "malicious15: bdb.Bdb.run(bdb.Bdb(), code)", ["bdb.Bdb.run", "bdb.Bdb"])
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("data.pkl", whole(call(sglob("builtins", "eval"), s("print('456')")), 4))
    put("test_zip_data_pkl_eval.zip", zbuf.getvalue(), "zip_file_path: a zip holding data.pkl that calls eval",
        ["builtins.eval"])
    put("webbrowser_open.pkl", whole(call(sglob("webbrowser", "open"), s("https://example.invalid")), 4),
        "webbrowser.open (modelscan settings: HIGH)", ["webbrowser.open"])
    skipped = [{"what": "malicious1_v{0,3,4}.dill, benign0_v*.dill", "why": "dill is not installed; dill writes "
                "builtins.eval as pickle does (the kind of malicious1_v*.pkl, in the picklescan corpus)"},
               {"what": "password_protected.zip, unsafe_zip_pytorch.pt", "why": "binary files of modelscan's "
                "repository (GitHub unreachable); unsafe_zip_pytorch.pt's kind is pytorch_zip_inject_system.pt"},
               {"what": "keras / tensorflow / benign files", "why": "not pickles (or not malicious)"}]
    return got, skipped

