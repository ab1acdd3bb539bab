"""The kinds of malicious pickles fickling 0.1.12's test-suite builds, built with fickling's public API.

Owns: tests/security/rebuild_fickling.py (called by tests/security/fetch_corpora.py). fickling's sdist holds no
tests; what they build was read from trailofbits/fickling test/ at tag v0.1.12 (test_pytorch.py, test_pickle.py,
test_polyglot.py, test_bypasses.py, test_crashes.py, test_scanner_deactivation_analysis.py); nothing is copied, each
kind is written here with fickling's own API (fickling.pytorch.PyTorchModelWrapper.inject_payload,
fickling.fickle.Pickled, read one pickle at a time from torch's stack of them, and its opcode classes,
fickling.polyglot) around real torch.save files and plain pickles of our own. Payload strings are never run here or by the tests (these files are only read).

build(out) -> ({relative path: (origin, labels?, labels_why?, names?)}, [skipped]); `names` lists the globals each
file calls (`module.name`, as the pickle spells them), which ckptconv must name besides what picklescan reports.
"""

import io
import pickle
import warnings

CODE = "print('fickling payload')"  # never run


def build(out):
    import torch
    from fickling import fickle as op
    from fickling.analysis import UnsafeImportsML
    from fickling.fickle import BUILTIN_MODULE_NAMES, Pickled
    from fickling.pytorch import PyTorchModelWrapper
    import fickling.polyglot

    out.mkdir(parents=True, exist_ok=True)
    got, skipped = {}, []

    def put(name, data, origin, names, labels=None, why=None):
        (out / name).write_bytes(data)
        got[name] = (origin, labels, why, sorted(names))

    def U(text):  # UNICODE takes its argument as UTF-8 bytes (and op.String omits STRING's newline in 0.1.12)
        return op.Unicode(text.encode())

    def pk(*ops):
        return Pickled([op.Proto.create(4), *ops, op.Stop()]).dumps()

    # --- test_pytorch.py: injections into a real torch.save file ---------------------------------------------------
    g = torch.Generator().manual_seed(0)
    sd = {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)}
    base = out / "_base.pt"
    torch.save(sd, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for how, names in (("insertion", ["builtins.exec"]), ("combination", ["__builtin__.eval"])):  # as written
            target = out / f"pytorch_inject_{how}.pt"
            PyTorchModelWrapper(base).inject_payload(CODE, target, injection=how)
            got[target.name] = (f"fickling.pytorch.PyTorchModelWrapper.inject_payload(injection={how!r}) on a "
                                f"torch.save zip (test_pytorch.py test_injection_{how})", None, None, names)

    # A legacy (pre-1.6) torch.save file: the object pickle (4th of 5 stacked pickles) gets an exec inserted.
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    stream = io.BytesIO(buf.getvalue())
    pickles = [Pickled.load(stream) for _ in range(5)]
    rest = stream.read()
    pickles[3].insert_python_exec(CODE)
    put("pytorch_legacy_insert_exec.pt", b"".join(p.dumps() for p in pickles) + rest,
        "legacy torch.save file, Pickled.insert_python_exec into its object pickle (test_pickle.py test_insert_stacked, "
        "on torch's stacked pickles)", ["builtins.exec"])

    # --- test_pickle.py: Pickled insertions into plain pickles -------------------------------------------------------
    plain = pickle.dumps({"weights": [1.0, 2.0, 3.0], "step": 7})
    p = Pickled.load(plain)
    p.insert_python_eval(CODE)
    put("insert_python_eval_first.pkl", p.dumps(), "Pickled.insert_python_eval (run first, keep the result)",
        ["builtins.eval"])
    p = Pickled.load(plain)
    p.insert_python_eval("[5, 6, 7, 8]", run_first=False, use_output_as_unpickle_result=True)
    put("insert_python_eval_last_replace.pkl", p.dumps(),
        "Pickled.insert_python_eval(run_first=False, use_output_as_unpickle_result=True)", ["builtins.eval"])
    p = Pickled.load(plain)
    p.insert_python_exec(CODE, run_first=False)
    put("insert_python_exec_last.pkl", p.dumps(), "Pickled.insert_python_exec(run_first=False)", ["builtins.exec"])
    p = Pickled.load(plain)
    p.insert_function_call_on_unpickled_object("def touch(obj):\n    return obj")
    put("insert_function_call.pkl", p.dumps(), "Pickled.insert_function_call_on_unpickled_object",
        ["builtins.exec", "builtins.eval"])
    p = Pickled.load(plain)
    p.insert_function_call_on_unpickled_object("def touch(obj):\n    return obj", compile_code=True)
    put("insert_function_call_compiled.pkl", p.dumps(),
        "Pickled.insert_function_call_on_unpickled_object(compile_code=True): marshal.loads + exec",
        ["marshal.loads", "builtins.exec", "builtins.eval"])
    p = Pickled.load(plain)
    p.append_python("id", module="os", attr="system", pop_result=True)
    put("append_python_os_system.pkl", p.dumps(), "Pickled.append_python(module='os', attr='system')", ["os.system"])
    put("call_builtins_eval.pkl", Pickled([op.Global.create("builtins", "eval"), op.Mark(), U("(lambda:1234)()"),
                                           op.Tuple(), op.Reduce(), op.Stop()]).dumps(),
        "GLOBAL builtins.eval, MARK, UNICODE, TUPLE, REDUCE (test_pickle.py test_call)", ["builtins.eval"])
    # fickling's Inst.encode fails in 0.1.12 (it reads a missing attribute): the INST line is spliced in by hand.
    put("inst_builtins_exec.pkl", Pickled([op.Mark(), U(CODE)]).dumps() + b"ibuiltins\nexec\n.",
        "MARK, UNICODE, INST builtins.exec (test_pickle.py test_inst, with exec)", ["builtins.exec"])

    # --- test_polyglot.py: a pickle and a torch.save zip in one file -------------------------------------------------
    mal = out / "_malicious.pkl"
    mal.write_bytes(pk(op.Global.create("os", "system"), op.ShortBinUnicode("id"), op.TupleOne(), op.Reduce()))
    poly = out / "polyglot_pickle_then_torch_zip.pt"
    poly.write_bytes(mal.read_bytes())
    fickling.polyglot.create_zip_pickle_polyglot(str(base), str(poly))
    got[poly.name] = ("fickling.polyglot.create_zip_pickle_polyglot: a pickle calling os.system with a torch.save zip "
                      "appended (torch.load takes the pickle: the file does not start with a zip header)",
                      None, None, ["os.system"])
    for tmp in (base, mal):
        tmp.unlink()

    # --- test_bypasses.py: scanner bypasses, written with fickling's opcode classes ----------------------------------
    S = op.ShortBinUnicode

    def sg(module, name):
        return [S(module), op.Memoize(), S(name), op.Memoize(), op.StackGlobal(), op.Memoize()]

    bypasses = {
        "bypass_pty_spawn_build.pkl": ("pty.spawn REDUCE then BUILD (GHSA-r7v6-mfhq-g3m2)", ["pty.spawn"],
                                       [*sg("pty", "spawn"), S("id"), op.TupleOne(), op.Reduce(), S("x"), op.Build()]),
        "bypass_pty_spawn_obj.pkl": ("MARK, GLOBAL pty spawn, OBJ (fickling PR 108)", ["pty.spawn"],
                                     [op.Mark(), op.Global("pty spawn"), U("id"), op.Obj()]),
        "bypass_marshal_functiontype.pkl": (
            "marshal.loads of code, types.FunctionType, call (GHSA-565g-hwwr-4pp3)", ["marshal.loads", "types.FunctionType"],
            [*sg("marshal", "loads"), op.ShortBinBytes(b"\xe3" + b"\0" * 16), op.TupleOne(), op.Reduce(), op.Memoize(),
             *sg("types", "FunctionType"), op.BinGet(3), op.EmptyDict(), op.TupleTwo(), op.Reduce(), op.EmptyTuple(),
             op.Reduce()]),
        "bypass_runpy_run_path.pkl": ("runpy.run_path (GHSA-wfq2-52f7-7qvj)", ["runpy.run_path"],
                                      [*sg("runpy", "run_path"), S("/tmp/x.py"), op.TupleOne(), op.Reduce()]),
        "bypass_cprofile_run.pkl": ("cProfile.run (GHSA-p523-jq9w-64x9)", ["cProfile.run"],
                                    [*sg("cProfile", "run"), S(CODE), op.TupleOne(), op.Reduce()]),
        "bypass_ctypes_cdll_getattr.pkl": (
            "builtins.getattr(ctypes.CDLL('libc.so.6'), 'system')('id') (GHSA-5hvc-6wx8-mvv4)",
            ["builtins.getattr", "ctypes.CDLL"],
            [*sg("builtins", "getattr"), *sg("ctypes", "CDLL"), S("libc.so.6"), op.TupleOne(), op.Reduce(), S("system"),
             op.TupleTwo(), op.Reduce(), op.ShortBinBytes(b"id"), op.TupleOne(), op.Reduce()]),
        "bypass_pydoc_locate.pkl": ("pydoc.locate('os.system')('id')", ["pydoc.locate"],
                                    [*sg("pydoc", "locate"), S("os.system"), op.TupleOne(), op.Reduce(), S("id"),
                                     op.TupleOne(), op.Reduce()]),
        "bypass_importlib_import_module.pkl": (
            "builtins.getattr(importlib.import_module('os'), 'system')('id')",
            ["builtins.getattr", "importlib.import_module"],
            [*sg("builtins", "getattr"), *sg("importlib", "import_module"), S("os"), op.TupleOne(), op.Reduce(),
             S("system"), op.TupleTwo(), op.Reduce(), S("id"), op.TupleOne(), op.Reduce()]),
        "bypass_code_interactiveinterpreter.pkl": (
            "getattr(code.InteractiveInterpreter(), 'runsource')(...)", ["builtins.getattr", "code.InteractiveInterpreter"],
            [*sg("builtins", "getattr"), *sg("code", "InteractiveInterpreter"), op.EmptyTuple(), op.Reduce(),
             S("runsource"), op.TupleTwo(), op.Reduce(), S(CODE), op.TupleOne(), op.Reduce()]),
        "bypass_multiprocessing_spawnv_passfds.pkl": (
            "multiprocessing.util.spawnv_passfds(b'/bin/sh', [...], ())", ["multiprocessing.util.spawnv_passfds"],
            [*sg("multiprocessing.util", "spawnv_passfds"), op.ShortBinBytes(b"/bin/sh"), op.EmptyList(), op.Mark(),
             op.ShortBinBytes(b"/bin/sh"), op.ShortBinBytes(b"-c"), op.ShortBinBytes(b"id"), op.Appends(),
             op.EmptyTuple(), op.TupleThree(), op.Reduce()]),
        "bypass_builtins_import_getattr.pkl": (
            "__import__('os') and getattr(.., 'system') through PUT/GET (GHSA-h4rm-mm56-xf63)",
            ["builtins.__import__", "builtins.getattr"],
            [op.Global("builtins __import__"), U("os"), op.TupleOne(), op.Reduce(), op.Put(0), op.Pop(),
             op.Global("builtins getattr"), op.Get.create(0), U("system"), op.TupleTwo(), op.Reduce(),
             op.Put(1), op.Pop(), op.Get.create(1), U("id"), op.TupleOne(), op.Reduce()]),
        "bypass_operator_methodcaller.pkl": (
            "_operator.methodcaller('system', 'id')(__import__('os')) (picklescan GHSA-955r-x9j8-7rhh)",
            ["_operator.methodcaller", "builtins.__import__"],
            [op.Global.create("_operator", "methodcaller"), U("system"), U("id"), op.TupleTwo(),
             op.Reduce(), op.Global.create("builtins", "__import__"), U("os"), op.TupleOne(), op.Reduce(),
             op.TupleOne(), op.Reduce()]),
        "bypass_distutils_write_file.pkl": ("distutils.file_util.write_file (picklescan GHSA-m273-6v24-x4m4)",
                                            ["distutils.file_util.write_file"],
                                            [S("distutils.file_util"), S("write_file"), op.StackGlobal(),
                                             S("/tmp/x.txt"), S("content"), op.TupleTwo(), op.Reduce()]),
        "bypass_io_fileio.pkl": ("_io.FileIO('/etc/passwd')", ["_io.FileIO"],
                                 [S("_io"), S("FileIO"), op.StackGlobal(), S("/etc/passwd"), op.TupleOne(),
                                  op.Reduce()]),
        "bypass_numpy_getlincoef.pkl": ("numpy.f2py.crackfortran.getlincoef (picklescan GHSA-r8g5-cgf2-4m4m)",
                                        ["numpy.f2py.crackfortran.getlincoef"],
                                        [S("numpy.f2py.crackfortran"), S("getlincoef"), op.StackGlobal(),
                                         S("__import__('os').system('id')"), op.EmptyDict(), op.TupleTwo(),
                                         op.Reduce()]),
        "bypass_asyncio_subprocess.pkl": (
            "asyncio.unix_events._UnixSubprocessTransport._start (picklescan GHSA-f7qq-56ww-84cr)",
            ["asyncio.unix_events._UnixSubprocessTransport._start"],
            [S("asyncio.unix_events"), S("_UnixSubprocessTransport._start"), op.StackGlobal(), op.Mark(),
             op.EmptyDict(), S("id"), op.NewTrue(), op.Tuple(),
             op.Reduce()]),
        "bypass_obj_pop_smtplib.pkl": ("MARK, smtplib.SMTP, OBJ, POP: a call whose result is dropped (GHSA-mxhj-88fx-4pcv)",
                                       ["smtplib.SMTP"],
                                       [op.Mark(), S("smtplib"), S("SMTP"), op.StackGlobal(), S("127.0.0.1"), op.Obj(),
                                        op.Pop(), op.EmptyDict()]),
        "bypass_uuid_get_command_stdout.pkl": ("uuid._get_command_stdout (GHSA-5hwf-rc88-82xm)",
                                               ["uuid._get_command_stdout"],
                                               [S("uuid"), S("_get_command_stdout"), op.StackGlobal(), S("echo"),
                                                S("PROOF_OF_CONCEPT"), op.TupleTwo(), op.Reduce()]),
        "bypass_aix_support.pkl": ("_aix_support._read_cmd_output (GHSA-5hwf-rc88-82xm)",
                                   ["_aix_support._read_cmd_output"],
                                   [S("_aix_support"), S("_read_cmd_output"), op.StackGlobal(), S("echo x"),
                                    op.TupleOne(), op.Reduce()]),
        "bypass_osx_find_build_tool.pkl": ("_osx_support._find_build_tool (GHSA-5hwf-rc88-82xm)",
                                           ["_osx_support._find_build_tool"],
                                           [S("_osx_support"), S("_find_build_tool"), op.StackGlobal(),
                                            S("x; echo INJECTED #"), op.TupleOne(), op.Reduce()]),
        "bypass_pathlib_dotted_os_system.pkl": ("STACK_GLOBAL('pathlib', 'os.system'): os.system through another "
                                                "module's attribute (GHSA-5j3x-jp52-966f)", ["pathlib.os.system"],
                                                [S("pathlib"), S("os.system"), op.StackGlobal(), op.EmptyTuple(),
                                                 op.Reduce()]),
        "scanner_deactivation_remove_hook.pkl": ("fickling.hook.remove_hook() (test_scanner_deactivation_analysis.py)",
                                                 ["fickling.hook.remove_hook"],
                                                 [S("fickling.hook"), S("remove_hook"), op.StackGlobal(),
                                                  op.EmptyTuple(), op.Reduce()]),
    }
    for module, cls, port in (("smtplib", "SMTP", 25), ("imaplib", "IMAP4", 143), ("ftplib", "FTP", 21),
                              ("poplib", "POP3", 110), ("telnetlib", "Telnet", 23), ("nntplib", "NNTP", 119)):
        bypasses[f"ssrf_{module}.pkl"] = (f"{module}.{cls}('127.0.0.1', {port}) then BUILD (test_network_protocol_ssrf)",
                                          [f"{module}.{cls}"],
                                          [op.Global.create(module, cls), S("127.0.0.1"), op.BinInt2(port),
                                           op.TupleTwo(), op.Reduce(), op.EmptyDict(), op.Build()])
    for name, (origin, names, ops) in bypasses.items():
        put(name, pk(*ops), f"fickling test_bypasses.py kind: {origin}", names)

    # test_crashes.py: os.system spelled by itemgetter/join at unpickling time, then STACK_GLOBAL of the result.
    alphabet = "Jw~[v5QpA(BY%aKnyT&*x0r9-OpfF}HN4$GU2VhS@XEq!Zt>6_R7#]1b{z3M^D?)d8eImgckPLiuoClW<js"
    dyn = [op.Global.create("operator", "itemgetter"), op.BinPut(0), op.Pop(),
           op.Global.create("builtins", "getattr"), op.Mark(), S(""), S("join"), op.Tuple(), op.Reduce(), op.Memoize(),
           op.BinGet(0), op.Mark(), op.BinInt1(77), op.BinInt1(83), op.Tuple(), op.Reduce(), op.Mark(),
           op.BinUnicode(alphabet), op.Tuple(), op.Reduce(), op.Memoize(),
           op.BinGet(1), op.Mark(), op.BinGet(2), op.Tuple(), op.Reduce(), op.Memoize(),
           op.BinGet(0), op.Mark(), *[op.BinInt1(k) for k in (83, 16, 83, 47, 67, 69)], op.Tuple(), op.Reduce(),
           op.Mark(), op.BinUnicode(alphabet), op.Tuple(), op.Reduce(), op.Memoize(),
           op.BinGet(1), op.Mark(), op.BinGet(4), op.Tuple(), op.Reduce(), op.Memoize(),
           op.BinGet(3), op.BinGet(5), op.StackGlobal()]
    put("dynamic_stack_global_itemgetter.pkl", pk(*dyn),
        "test_crashes.py test_stack_global_dynamic_import: 'os' and 'system' built by operator.itemgetter and "
        "str.join, then STACK_GLOBAL", ["operator.itemgetter", "builtins.getattr"])

    # test_bypasses.py TestUnsafeModuleCoverage: every module and import of fickling's ML lists, called.
    for module in sorted(UnsafeImportsML.UNSAFE_MODULES):
        func = "eval" if module in BUILTIN_MODULE_NAMES else "dangerous"
        put(f"ml_unsafe_module_{module}.pkl", pk(op.Global.create(module, func), op.EmptyTuple(), op.Reduce()),
            f"fickling UnsafeImportsML.UNSAFE_MODULES coverage: {module}.{func}()", [f"{module}.{func}"])
    for module, funcs in sorted(UnsafeImportsML.UNSAFE_IMPORTS.items()):
        for func in sorted(funcs):
            put(f"ml_unsafe_import_{module}.{func}.pkl", pk(op.Global.create(module, func), op.EmptyTuple(), op.Reduce()),
                f"fickling UnsafeImportsML.UNSAFE_IMPORTS coverage: {module}.{func}()", [f"{module}.{func}"])

    # A reference with no call (test_bypasses.py test_ml_allowlist_not_shadowed...): the pickle's result is the
    # function ast.parse itself, no tensor. Nothing is called, so ckptconv may refuse it as holding no tensors.
    put("reference_only_ast_parse.pkl", pk(S("ast"), S("parse"), op.StackGlobal()),
        "STACK_GLOBAL ast.parse and STOP: a global referenced, never called", [],
        labels=["unsafe-global", "no-tensors"],
        why="nothing is called: the pickle is the function ast.parse itself, no tensor; a refusal as unsafe-global "
            "(naming it) or as holding no tensors are both clear")
    return got, skipped
