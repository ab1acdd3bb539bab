"""Our own gadgets for issue #16: one real checkpoint per route by which a pickle can run code past a denylist.

Owns: tests/security/gadgets.py. build(out) writes each gadget into `out` and returns the list of Gadget records
(also written to out/gadgets.json): a torch.save file (zip or legacy), a DCP folder whose .metadata pickle carries the
payload, or a Megatron folder (legacy rank file `args`, torch_dist `common.pt`) copied from tests/fixtures/megatron
and re-saved with torch.save. The payload goes in by hand-written opcodes (tests/security/ops.py: `Raw` written in
place by the pickler torch.save is given) or, for the backward hook, by a reducer that rebuilds a tensor with a hook.

Each gadget records the globals ckptconv's refusal must name (`names`, as the pickle spells them) and how its payload
is shown to be live: `live` = "torch" (torch.load(path, weights_only=False) of `load`), "pickle" (pickle.load of
`load`, the DCP .metadata as torch's FileSystemReader reads it) or "backward" (torch.load, then backward through the
hooked tensor). A live payload creates ops.MARKER (PWNED) in the loader's working folder: prove_live() loads every live
gadget in a forked child with its own empty working folder and reports which created it. ckptconv must refuse each
gadget (exit 1, error[unsafe-global], naming the file and every recorded global) and create no marker.

  .venv/bin/python tests/security/gadgets.py OUT [--live]     (writes the gadgets; --live also loads them)
"""

import argparse
import json
import os
import shutil
import sys
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import ops  # noqa: E402
from ops import MARKER, NONE, PYCODE, SHELL, TRUE, Raw, by, call, dct, glob, lst, s, tup  # noqa: E402

MEGATRON = REPO / "tests" / "fixtures" / "megatron"


@dataclass
class Gadget:
    id: str
    route: str  # the route, in a line
    path: str  # what ckptconv is given (file or folder), relative to the gadgets folder
    names: list  # globals the refusal must name, `module.name` as the pickle spells them
    live: str = ""  # "torch", "pickle" or "backward"; "" when the payload cannot run under torch.load here
    load: str = ""  # the file the liveness check loads (relative), default `path`
    not_live: str = ""  # why there is no liveness check
    base: str = ""  # Megatron: the base Hugging Face folder (relative) given with --base
    extra: dict = field(default_factory=dict)


def tensors():
    import torch

    g = torch.Generator().manual_seed(16)
    return {"model.layers.0.weight": torch.randn(4, 3, generator=g), "model.layers.0.bias": torch.randn(4, generator=g)}


def save(path, payload, legacy=False, reducer=None, extra=None):
    """torch.save of a small state dict plus `payload` (opcodes) under 'zz_payload', written in place."""
    import torch

    sd = tensors()
    sd.update(extra or {})
    if payload is not None:
        sd["zz_payload"] = Raw(payload)
    torch.save(sd, path, pickle_module=ops.inject_module(reducer), _use_new_zipfile_serialization=not legacy)


def os_system(cmd=SHELL):
    return call(glob("os", "system"), s(cmd))


def newobj(cls, *args):
    return cls + tup(*args) + b"\x81"  # NEWOBJ


def newobj_ex(cls, args, kwargs):
    return cls + args + kwargs + b"\x92"  # NEWOBJ_EX


def rezip(path, edit):
    """Rewrites a torch.save zip with data.pkl's bytes passed through edit() (entries stored, names kept)."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, edit(data) if name.endswith("/data.pkl") else data)


def build(out):
    import torch

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gadgets = []

    def pt(id, route, payload, names, live="torch", not_live="", **kw):
        save(out / f"{id}.pt", payload, **kw)
        gadgets.append(Gadget(id, route, f"{id}.pt", names, live if not not_live else "", not_live=not_live))

    pt("copyreg_reconstructor_popen", "copyreg._reconstructor(subprocess.Popen, subprocess.Popen, [...]): the class "
       "runs through _reconstructor's base.__init__",
       call(glob("copyreg", "_reconstructor"), glob("subprocess", "Popen"), glob("subprocess", "Popen"),
            lst(s("touch"), s(MARKER))), ["subprocess.Popen"])
    pt("list_map_os_system", "list(map(os.system, [...])): os.system only referenced, map calls it",
       call(glob("builtins", "list"), call(glob("builtins", "map"), glob("os", "system"), lst(s(SHELL)))),
       ["builtins.map", "os.system"])
    pt("pydoc_locate", "pydoc.locate('os.system') then a call of its result",
       call(call(glob("pydoc", "locate"), s("os.system")), s(SHELL)), ["pydoc.locate"])
    pt("pkgutil_resolve_name", "pkgutil.resolve_name('os:system') then a call of its result",
       call(call(glob("pkgutil", "resolve_name"), s("os:system")), s(SHELL)), ["pkgutil.resolve_name"])
    pt("operator_attrgetter", "_operator.attrgetter('system')(__import__('os'))(...)",
       call(call(call(glob("_operator", "attrgetter"), s("system")), call(glob("builtins", "__import__"), s("os"))),
            s(SHELL)), ["_operator.attrgetter", "builtins.__import__"])
    pt("functools_partial", "_functools.partial(os.system, cmd)()",
       call(call(glob("_functools", "partial"), glob("os", "system"), s(SHELL))), ["_functools.partial", "os.system"])
    pt("uuid_get_command_stdout", "uuid._get_command_stdout('touch', marker)",
       call(glob("uuid", "_get_command_stdout"), s("touch"), s(MARKER)), ["uuid._get_command_stdout"])
    pt("osx_support_read_output", "_osx_support._read_output(cmd): os.system underneath",
       call(glob("_osx_support", "_read_output"), s(SHELL)), ["_osx_support._read_output"])
    pt("imaplib_imap4_stream", "imaplib.IMAP4_stream(cmd): a shell command as the IMAP transport",
       call(glob("imaplib", "IMAP4_stream"), s(SHELL)), ["imaplib.IMAP4_stream"])
    pt("pydoc_pipepager", "pydoc.pipepager('', cmd): a shell command as the pager",
       call(glob("pydoc", "pipepager"), s(""), s(SHELL)), ["pydoc.pipepager"])
    pt("venv_create", "venv.create(dir): writes a virtual environment (the marker is the folder)",
       call(glob("venv", "create"), s(MARKER)), ["venv.create"])
    pt("ensurepip_run_pip", "ensurepip._run_pip(args): args pasted into `python -c` code",
       call(glob("ensurepip", "_run_pip"), s(f"__import__('os').system({SHELL!r})")), ["ensurepip._run_pip"])
    pt("doctest_debug_script", "doctest.debug_script(src, pm=True): exec of src",
       call(glob("doctest", "debug_script"), s(PYCODE), TRUE), ["doctest.debug_script"])
    pt("torch_collect_env_run", "torch.utils.collect_env.run(cmd): a shell command",
       call(glob("torch.utils.collect_env", "run"), s(SHELL)), ["torch.utils.collect_env.run"])
    nested = ops.whole(os_system())  # a bare pickle: torch.load reads it as the legacy magic number, running it
    pt("torch_storage_load_from_bytes", "torch.storage._load_from_bytes(b): torch.load(weights_only=False) of a nested "
       "pickle", call(glob("torch.storage", "_load_from_bytes"), by(nested)), ["torch.storage._load_from_bytes"])
    pt("torch_inductor_compile_file", "torch._inductor.codecache.compile_file(in, out, cmd)",
       call(glob("torch._inductor.codecache", "compile_file"), s(""), s(""), lst(s("touch"), s(MARKER))),
       ["torch._inductor.codecache.compile_file"],
       not_live=f"torch {torch.__version__} no longer has torch._inductor.codecache.compile_file (older ones ran cmd)")
    pt("torch_jit_execwrapper", "torch.jit.unsupported_tensor_ops.execWrapper(code, {}, {}): exec",
       call(glob("torch.jit.unsupported_tensor_ops", "execWrapper"), s(PYCODE), dct(), dct()),
       ["torch.jit.unsupported_tensor_ops.execWrapper"])
    (out / "nested_payload.pkl").write_bytes(nested)
    pt("torch_load", "torch.load(path, None, pickle): a pickle module given, so weights_only=False, of a nested file",
       call(glob("torch", "load"), s(str(out / "nested_payload.pkl")), NONE, glob("torch.serialization", "pickle")),
       ["torch.load", "torch.serialization.pickle"])
    hub = out / "hub_repo"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"dependencies = []\n{PYCODE}\n\n\ndef model(*args, **kwargs):\n    return None\n")
    pt("torch_hub_load", "torch.hub.load(dir, 'model', source='local') through a partial built with NEWOBJ_EX: runs "
       "the folder's hubconf.py",
       call(newobj_ex(glob("_functools", "partial"), tup(glob("torch.hub", "load"), s(str(hub)), s("model")),
                      dct(source=s("local")))), ["torch.hub.load", "_functools.partial"])
    pt("numpy_runstring", "numpy.testing._private.utils.runstring(code, {}): exec",
       call(glob("numpy.testing._private.utils", "runstring"), s(PYCODE), dct()),
       ["numpy.testing._private.utils.runstring"])
    pt("numpy_f2py_getlincoef", "numpy.f2py.crackfortran.getlincoef(expr, {}): eval",
       call(glob("numpy.f2py.crackfortran", "getlincoef"), s(PYCODE), dct()), ["numpy.f2py.crackfortran.getlincoef"])
    rebind = (glob("torch", "_utils") + dct(_rebuild_tensor_v2=glob("os", "system")) + b"b"  # BUILD
              + b"0" + call(glob("torch._utils", "_rebuild_tensor_v2"), s(SHELL)))  # POP the module, call
    pt("build_module_rebind", "BUILD on the module torch._utils with {'_rebuild_tensor_v2': os.system}, then a call of "
       "the allowlisted-looking torch._utils._rebuild_tensor_v2", rebind, ["torch._utils", "os.system"])
    pt("inst_os_system", "INST os system (protocol 0 instantiation of a function)",
       b"(" + s(SHELL) + b"ios\nsystem\n", ["os.system"])
    pt("obj_os_system", "MARK, GLOBAL os system, args, OBJ", b"(" + glob("os", "system") + s(SHELL) + b"o", ["os.system"])
    pt("newobj_partial", "NEWOBJ of _functools.partial(os.system, cmd), then a call",
       call(newobj(glob("_functools", "partial"), glob("os", "system"), s(SHELL))), ["_functools.partial", "os.system"])
    pt("newobj_ex_partial", "NEWOBJ_EX of _functools.partial((os.system,), {}), then a call",
       call(newobj_ex(glob("_functools", "partial"), tup(glob("os", "system")), dct()), s(SHELL)),
       ["_functools.partial", "os.system"])
    pt("rebuild_from_type_v2_func", "torch._tensor._rebuild_from_type_v2(os.system, Tensor, (cmd,), {}): the func "
       "argument is called", call(glob("torch._tensor", "_rebuild_from_type_v2"), glob("os", "system"),
                                  glob("torch", "Tensor"), tup(s(SHELL)), dct()), ["os.system"])
    pt("legacy_format_os_system", "os.system in the object pickle of a legacy (pre-1.6) torch.save file",
       os_system(), ["os.system"], legacy=True)

    # A non-allowlisted class as the storage type of a tensor's persistent id.
    pt("storage_type_popen", "subprocess.Popen as the storage type in the persistent id of every tensor", None,
       ["subprocess.Popen"], not_live="torch.load only reads the storage type's .dtype (an AttributeError): no call")
    rezip(out / "storage_type_popen.pt", lambda d: d.replace(b"ctorch\nFloatStorage\n", b"csubprocess\nPopen\n"))

    # A backward hook: _rebuild_tensor_v2's backward_hooks argument holds partial(_osx_support._read_output, cmd);
    # torch.load sets it on the tensor, and backward calls it with the gradient (a truthy one-element tensor).
    import functools

    import _osx_support

    hooked = torch.ones(1, requires_grad=True)

    def reducer(obj):
        if obj is hooked:
            storage = torch.storage.TypedStorage(wrap_storage=obj.untyped_storage(), dtype=obj.dtype, _internal=True)
            hooks = OrderedDict([(0, functools.partial(_osx_support._read_output, SHELL))])
            return torch._utils._rebuild_tensor_v2, (storage, 0, (1,), (1,), True, hooks)
        return NotImplemented

    save(out / "backward_hook.pt", None, reducer=reducer, extra={"hooked": hooked})
    gadgets.append(Gadget("backward_hook", "a backward hook (functools.partial of _osx_support._read_output) in a "
                          "tensor's _rebuild_tensor_v2 arguments", "backward_hook.pt",
                          ["functools.partial", "_osx_support._read_output"], live="backward",
                          extra={"tensor": "hooked"}))

    # DCP: a real single-process dcp.save, its .metadata re-pickled with os.system in planner_data.
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = out / "dcp_metadata"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": tensors()}, checkpoint_id=str(folder))
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own file, just written by dcp.save
    meta.planner_data = dict(meta.planner_data or {}, zz_payload=Raw(os_system()))
    with open(folder / ".metadata", "wb") as f:
        ops.inject_module().dump(meta, f, protocol=pickle.DEFAULT_PROTOCOL)
    gadgets.append(Gadget("dcp_metadata", "os.system in the .metadata pickle of a DCP folder (planner_data)",
                          "dcp_metadata", ["os.system"], live="pickle", load="dcp_metadata/.metadata"))

    # Megatron: a legacy rank file whose args Namespace holds the payload; a torch_dist common.pt the same.
    case = out / "megatron_args"
    shutil.copytree(MEGATRON / "qwen2_tp1" / "actor", case / "actor")
    shutil.copytree(MEGATRON / "qwen2_tp1" / "base_hf", case / "base_hf")
    rank = case / "actor" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    with warnings.catch_warnings():  # megatron-core, imported by the args' classes, warns about missing extras
        warnings.simplefilter("ignore")
        state = torch.load(rank, weights_only=False)  # the repo's own fixture
    state["args"].zz_payload = Raw(os_system())
    torch.save(state, rank, pickle_module=ops.inject_module())
    gadgets.append(Gadget("megatron_args", "os.system in Megatron's args Namespace of a legacy rank file "
                          "(model_optim_rng.pt)", "megatron_args/actor", ["os.system"], live="torch",
                          load=str(rank.relative_to(out)), base="megatron_args/base_hf"))
    case = out / "megatron_common"
    shutil.copytree(MEGATRON / "llama_tp2" / "actor_dist", case / "actor_dist")
    shutil.copytree(MEGATRON / "llama_tp2" / "base_hf", case / "base_hf")
    common = case / "actor_dist" / "iter_0000001" / "common.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(common, weights_only=False)  # the repo's own fixture
    state["args"].zz_payload = Raw(os_system())
    torch.save(state, common, pickle_module=ops.inject_module())
    gadgets.append(Gadget("megatron_common", "os.system in the args of a Megatron torch_dist common.pt",
                          "megatron_common/actor_dist", ["os.system"], live="torch", load=str(common.relative_to(out)),
                          base="megatron_common/base_hf"))

    (out / "gadgets.json").write_text(json.dumps([asdict(g) for g in gadgets], indent=1) + "\n")
    return gadgets


def load(out):
    return [Gadget(**g) for g in json.loads((Path(out) / "gadgets.json").read_text())]


# --- liveness ----------------------------------------------------------------------------------------------------

def _load_one(g, root):
    import pickle

    import torch

    path = root / (g.load or g.path)
    if g.live == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        obj = torch.load(path, weights_only=False)
        if g.live == "backward":
            obj[g.extra["tensor"]].sum().backward()


def prove_live(root, work):
    """{gadget id: True if its payload created the marker} for every live gadget, each loaded in a forked child
    (torch imported once) whose working folder is work/<id>, with stdin closed and a 120 s alarm."""
    import signal

    import numpy  # noqa: F401  (imported before forking, as torch is)
    import torch  # noqa: F401

    root, work = Path(root), Path(work)
    result = {}
    for g in load(root):
        if not g.live:
            continue
        cwd = work / g.id
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:  # the child: load, then reap whatever the payload started, then exit without cleanup
            try:
                os.chdir(cwd)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                signal.alarm(120)
                try:
                    _load_one(g, root)
                except BaseException:
                    pass
                while True:
                    try:
                        os.waitpid(-1, 0)
                    except ChildProcessError:
                        break
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        result[g.id] = (cwd / MARKER).exists()
    return result


def main():
    ap = argparse.ArgumentParser(description="Writes the issue #16 gadgets (and proves their payloads live).")
    ap.add_argument("out")
    ap.add_argument("--live", metavar="WORK", help="load every live gadget with its working folder under WORK and "
                                                    "print {id: marker created} as JSON")
    ap.add_argument("--no-build", action="store_true", help="use the gadgets already in OUT")
    a = ap.parse_args()
    if not a.no_build:
        build(a.out)
    if a.live:
        print(json.dumps(prove_live(a.out, a.live)))


if __name__ == "__main__":
    main()
