"""Runs ckptconv.wasm under the real wasmtime engine from PyPI, with the `wasmtime run` command line's meaning.

Owns: wasi/run.py. For machines without the `wasmtime` CLI (it takes most of an hour to build from source): the
PyPI `wasmtime` package embeds the same engine, prebuilt. Accepted, as `wasmtime run` spells them, before the
module: `--dir HOST[::GUEST]` (preopen; the guest sees nothing else), `-W max-memory-size=BYTES`,
`-W timeout=SECONDS[s]`, `-W fuel=N`. Exit codes follow the CLI: the guest's own code, or 134 for a trap (a
panic, the memory cap, the timeout, running out of fuel). `CKPTCONV_WASM_MEMORY_REPORT=FILE` writes the peak
linear-memory size in bytes (wasm memory never shrinks, so its final size is its peak).

  .venv/bin/python wasi/run.py --dir IN::/in --dir OUT::/out target/wasi/ckptconv.wasm convert /in/x.pt /out
"""

import glob
import hashlib
import os
import sys
import threading

import wasmtime


def parse(argv):
    dirs, limits = [], {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i]
        if flag in ("--dir", "-W") and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        elif flag.startswith("--dir="):
            value, flag = flag.split("=", 1)[1], "--dir"
            i += 1
        else:
            sys.exit(f"run.py: unsupported option {flag}")
        if flag == "--dir":
            host, _, guest = value.partition("::")
            dirs.append((host, guest or host))
        else:
            key, _, v = value.partition("=")
            limits[key] = v
    if i >= len(argv):
        sys.exit("usage: run.py [--dir HOST::GUEST]... [-W key=value]... MODULE.wasm [ARGS]...")
    return dirs, limits, argv[i], argv[i + 1:]


def prune(path, keep=8):
    """Deletes all but the newest `keep` cached compilations of `path` (older builds, other -W keys: ~5 MB each).
    Best effort: a parallel run may be deleting the same files."""
    def mtime(p):
        try:
            return os.stat(p).st_mtime
        except OSError:
            return 0

    for old in sorted(glob.glob(f"{path}.*.cwasm"), key=mtime, reverse=True)[keep:]:
        try:
            os.remove(old)
        except OSError:
            pass


def load_module(engine, path, config_key):
    """Compiles the module once and reuses the machine code (a .cwasm beside it, keyed by the module's bytes and
    the engine options), so a test suite of many runs does not recompile 1.6 MB of wasm each time."""
    data = open(path, "rb").read()
    key = hashlib.sha256(data + repr(config_key).encode()).hexdigest()[:16]
    cached = f"{path}.{key}.cwasm"
    if os.path.exists(cached):
        try:
            return wasmtime.Module.deserialize_file(engine, cached)
        except wasmtime.WasmtimeError:
            pass
    module = wasmtime.Module(engine, data)
    tmp = f"{cached}.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(module.serialize())
        os.replace(tmp, cached)
        prune(path)
    except OSError as e:  # a cache, not a result: a full disk or read-only folder only costs the next run a compile
        print(f"run.py: not caching compiled module at {cached}: {e}", file=sys.stderr)
        try:
            os.remove(tmp)
        except OSError:
            pass
    return module


def main():
    dirs, limits, module_path, args = parse(sys.argv[1:])
    config = wasmtime.Config()
    if "fuel" in limits:
        config.consume_fuel = True
    if "timeout" in limits:
        config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    if "max-memory-size" in limits:
        store.set_limits(memory_size=int(limits["max-memory-size"]))
    if "fuel" in limits:
        store.set_fuel(int(limits["fuel"]))
    if "timeout" in limits:
        store.set_epoch_deadline(1)
        seconds = float(limits["timeout"].rstrip("s"))
        timer = threading.Timer(seconds, engine.increment_epoch)
        timer.daemon = True
        timer.start()
    wasi = wasmtime.WasiConfig()
    wasi.argv = [os.path.basename(module_path)] + args
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.inherit_stdin()
    for host, guest in dirs:
        wasi.preopen_dir(host, guest)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = load_module(engine, module_path, config_key=sorted(limits))
    instance = linker.instantiate(store, module)
    memory = instance.exports(store).get("memory")
    code = 0
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        code = e.code
    except wasmtime.Trap as e:
        print(f"run.py: wasm trap: {e}", file=sys.stderr)
        code = 134
    except wasmtime.WasmtimeError as e:
        print(f"run.py: wasmtime error: {e}", file=sys.stderr)
        code = 134
    report = os.environ.get("CKPTCONV_WASM_MEMORY_REPORT")
    if report and memory is not None:
        with open(report, "w") as f:
            f.write(str(memory.data_len(store)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
