"""The Ray driver: plans a ckptconv conversion, runs its parts as Ray tasks, then finishes it on the driver.

Owns: python/ckptconv_ray/driver.py (the command line, the part task and which failures Ray retries). Steps:
  1. plan: `ckptconv convert IN OUT FLAGS --plan-parts N` (JSON: each part's files and bytes); refuse when a
     planned output name already exists in OUT, or with --force remove the finishing files (index, config) there;
  2. connect: ray.init(address) (none: a local cluster of --num-cpus CPUs, no dashboard);
  3. parts: a Ray task for each part that has files, running `ckptconv convert IN OUT FLAGS --part I/N --force
     --quiet --jobs J` with num_cpus=J, memory=--memory, max_retries=R and retry_exceptions=[PartKilled]. Ray
     retries a part whose ckptconv died by a signal or whose worker died; a part whose ckptconv exits non-zero (its
     clear error about the input or output, which a retry cannot fix) fails the run at once: the other parts are
     cancelled (their ckptconv killed) and their hidden partial files removed;
  4. finish: `ckptconv convert IN OUT FLAGS --finish --force [--verify]` on the driver checks every data file's
     planned size and writes the index, config and base-model files. After a failure it is not run, so OUT never
     looks finished.
Ray does all scheduling, placement and retrying. Cluster requirements: see __init__.py.
"""

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import ray
import ray.cloudpickle

# The task and its exceptions travel by value, so workers need ray but not this package.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GiB = 1 << 30
PATH_FLAGS = ("--base", "--lora-path")  # convert flags naming a folder: made absolute, and preopened under WASI
DRIVER_FLAGS = ("--part", "--finish", "--plan-parts")  # the driver passes these itself


class PartKilled(Exception):
    """A part's ckptconv died by a signal (the OOM killer, a preemption): Ray runs the part again."""


class PartFailed(Exception):
    """A part's ckptconv exited with an error about its input or output: running it again cannot help."""


class DriverError(Exception):
    """A failure reported as one `ckptconv_ray: error: ...` line; code is the exit status."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


@ray.remote
def run_part(cmd):
    """Runs one part's command on the node Ray chose: {seconds, attempts, node}, or raises PartKilled/PartFailed.

    Waits in short slices so that ray.cancel (which interrupts Python, not a blocked wait) kills the command, with
    everything it started (its own process group: a runner's children too)."""
    start = time.monotonic()
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            while True:
                try:
                    _, err = proc.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if proc.returncode < 0:
        raise PartKilled(f"ckptconv was killed by signal {-proc.returncode}")
    if proc.returncode:
        raise PartFailed(err.strip() or f"ckptconv exited with {proc.returncode}")
    return {"seconds": time.monotonic() - start, "attempts": attempt_number(), "node": ray.util.get_node_ip_address()}


def attempt_number():
    """Which run of this task this is (1 for the first), for reports only: Ray keeps it on the core worker, with no
    public call; None if a Ray version moves it."""
    try:
        return ray._private.worker.global_worker.core_worker.get_current_task_attempt_number() + 1
    except AttributeError:
        return None


def parse(argv):
    """(options, convert flags): the driver's own options, and the rest, passed verbatim to ckptconv convert."""
    p = argparse.ArgumentParser(
        prog="python -m ckptconv_ray", allow_abbrev=False,
        description="Convert a checkpoint with ckptconv as N parts on a Ray cluster, then finish it here. IN and "
                    "OUT come first; other flags (--base DIR, --dtype bf16, --max-shard-size 500MB, ...) are passed "
                    "to `ckptconv convert` verbatim.")
    p.add_argument("input", metavar="IN", help="the checkpoint (a file or folder every node sees at this path)")
    p.add_argument("out", metavar="OUT", help="the output folder (on a filesystem every node shares)")
    p.add_argument("--parts", type=int, required=True, metavar="N", help="split the output's data files into N parts")
    p.add_argument("--address", help="the Ray cluster to use (default: start a local one)")
    p.add_argument("--num-cpus", type=int, metavar="C",
                   help="CPUs of the local cluster (default: all); not with --address")
    runner = p.add_mutually_exclusive_group()
    runner.add_argument("--ckptconv", default="ckptconv", metavar="PATH",
                        help="the ckptconv binary, at this path on every node (default: the one on PATH)")
    runner.add_argument("--wasm", metavar="MODULE.wasm", help="run the WASI module ckptconv.wasm instead")
    p.add_argument("--wasmtime", default="wasmtime run", metavar="CMD",
                   help="the command that runs a WASI module, taking `--dir HOST` preopens (default: wasmtime run)")
    p.add_argument("--max-retries", type=int, default=3, metavar="R",
                   help="runs of a killed part beyond the first (default: 3)")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="files a part writes at once: the CPUs its task declares (default: 1)")
    p.add_argument("--memory", type=int, default=GiB, metavar="BYTES",
                   help="memory each part's task declares (default: 1 GiB)")
    p.add_argument("--verify", action="store_true", help="finish by comparing every tensor with the input")
    p.add_argument("--force", action="store_true", help="overwrite output files that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    p.add_argument("--timings", metavar="FILE", help="write the seconds of each step as JSON")
    opts, flags = p.parse_known_args(argv)
    for name, value, least in (("--parts", opts.parts, 1), ("--jobs", opts.jobs, 1), ("--memory", opts.memory, 1),
                               ("--max-retries", opts.max_retries, 0), ("--num-cpus", opts.num_cpus or 1, 1)):
        if value < least:
            p.error(f"{name} must be at least {least}")
    if opts.address and opts.num_cpus:
        p.error("--num-cpus sizes a local cluster: not with --address")
    for flag in flags:
        if flag.partition("=")[0] in DRIVER_FLAGS:
            p.error(f"{flag}: the driver passes --part, --finish and --plan-parts itself")
    return opts, flags


def absolute_paths(flags):
    """(flags, folders): the convert flags with each PATH_FLAGS value made absolute, and those values."""
    flags, folders = list(flags), []
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in PATH_FLAGS and eq:
            folders.append(os.path.abspath(value))
            flags[i] = f"{name}={folders[-1]}"
        elif flag in PATH_FLAGS and i + 1 < len(flags):
            folders.append(os.path.abspath(flags[i + 1]))
            flags[i + 1] = folders[-1]
    return flags, folders


def ckptconv_command(opts, folders):
    """The command line that runs ckptconv: the binary, or the runner with the WASI module and the folders the paths
    need preopened (host path = guest path): IN's parent, OUT and the path flags' folders."""
    if not opts.wasm:
        binary = shutil.which(opts.ckptconv)
        if not binary:
            raise DriverError(f"{opts.ckptconv}: no such executable (pass --ckptconv PATH)")
        return [os.path.abspath(binary)]
    runner = shlex.split(opts.wasmtime)
    program = shutil.which(runner[0]) if runner else None
    if not program:
        raise DriverError(f"{opts.wasmtime!r}: no such runner (pass --wasmtime CMD)")
    if not os.path.isfile(opts.wasm):
        raise DriverError(f"{opts.wasm}: no such WASI module")
    preopens = dict.fromkeys([os.path.dirname(opts.input), opts.out, *folders])
    return [os.path.abspath(program), *runner[1:], *(a for d in preopens for a in ("--dir", d)),
            os.path.abspath(opts.wasm)]


def run_here(cmd, what, capture=False):
    """Runs a step on the driver (ckptconv's stderr shown as it comes); its stdout when capture, else None."""
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else None, text=True)
    if r.returncode:
        raise DriverError(f"{what} failed (ckptconv exited with {r.returncode})", 2 if r.returncode == 2 else 1)
    return r.stdout


def clear_outputs(plan, out, force):
    """Without --force, refuses when an output file the plan names already exists in OUT. With it, removes the
    finishing files already there (an earlier run's index), so a failed run never leaves one beside new shards."""
    names = [f["name"] for g in plan["groups"] for f in g["files"]] + [f["name"] for f in plan["finishing"]]
    existing = [n for n in names if os.path.lexists(os.path.join(out, n))]
    if existing and not force:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise DriverError(f"{out}: {', '.join(existing[:3])}{more} already exist; pass --force to overwrite")
    for f in plan["finishing"]:
        if f["name"] in existing:
            os.remove(os.path.join(out, f["name"]))


def refuse_unreachable(address):
    """Refuses a host:port where nothing listens (Ray would retry it for many minutes); other forms are Ray's."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise DriverError(f"no Ray cluster at {address}: {e}") from None


def connect(opts):
    """ray.init: the given cluster, or a local one without a dashboard."""
    common = {"log_to_driver": False, "logging_level": logging.ERROR if opts.quiet else logging.WARNING}
    if not opts.address:
        ray.init(num_cpus=opts.num_cpus, include_dashboard=False, **common)
    else:
        refuse_unreachable(opts.address)
        try:
            ray.init(address=opts.address, **common)
        except ConnectionError as e:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                " (a cluster with token authentication also needs RAY_AUTH_MODE=token here)")
            raise DriverError(f"{e}{hint}") from None
    if opts.handle_sigterm:
        signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs its own


def check_fits(opts):
    """Refuses a cluster where no node can hold a part's task (Ray would wait for one forever)."""
    if not any(node["Alive"] and node["Resources"].get("CPU", 0) >= opts.jobs
               and node["Resources"].get("memory", 0) >= opts.memory for node in ray.nodes()):
        raise DriverError(f"no node of the Ray cluster has {opts.jobs} CPU(s) and {opts.memory} bytes of memory "
                          "for a part (lower --jobs or --memory)")


def run_parts(opts, plan, command, say):
    """Submits a task per part that has files and waits for them all: [{part, files, bytes, seconds, attempts, node}].

    On a failed part (or an interrupt) cancels the rest, waits for them to end and removes their partial files."""
    n = plan["parts"]
    pending = {}
    for g in plan["groups"]:
        if g["files"]:
            task = run_part.options(name=f"ckptconv part {g['part']}/{n}", num_cpus=opts.jobs, memory=opts.memory,
                                    max_retries=opts.max_retries, retry_exceptions=[PartKilled])
            pending[task.remote(command + ["--part", f"{g['part']}/{n}", "--force", "--quiet",
                                           "--jobs", str(opts.jobs)])] = g
    results = []
    try:
        while pending:
            [ref], _ = ray.wait(list(pending))
            g = pending.pop(ref)
            try:
                r = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise DriverError(f"part {g['part']}/{n} failed: {getattr(e, 'cause', None) or e}") from None
            results.append({"part": g["part"], "files": len(g["files"]), "bytes": g["bytes"], **r})
            say(f"part {g['part']}/{n}: {len(g['files'])} file(s), {g['bytes'] / 1e6:.2f} MB in {r['seconds']:.2f} s "
                f"on {r['node']}" + (f" (attempt {r['attempts']})" if (r["attempts"] or 1) > 1 else ""))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=60)
        for g in plan["groups"]:
            for f in g["files"]:
                partial = os.path.join(opts.out, f".{f['name']}.ckptconv-partial")
                if os.path.exists(partial):
                    os.remove(partial)
        raise
    return results


def convert(opts, flags):
    """Plans, runs the parts on Ray and finishes; returns the timings (seconds of each step, per-part results)."""
    say = (lambda line: None) if opts.quiet else (lambda line: print(f"ckptconv_ray: {line}", file=sys.stderr))
    opts.input, opts.out = os.path.abspath(opts.input), os.path.abspath(opts.out)
    flags, folders = absolute_paths(flags)
    if opts.wasm:
        os.makedirs(opts.out, exist_ok=True)  # a runner preopens only folders that exist
    command = ckptconv_command(opts, folders) + ["convert", opts.input, opts.out, *flags]
    timings, start = {}, time.monotonic()
    mark = start

    def lap(step):
        nonlocal mark
        now = time.monotonic()
        timings[step], mark = round(now - mark, 6), now

    plan = json.loads(run_here(command + ["--plan-parts", str(opts.parts)], "planning", capture=True))
    clear_outputs(plan, opts.out, opts.force)
    lap("plan")
    # A caller that is connected already (a service converting many checkpoints) keeps its connection: the job's
    # worker processes, started for its first conversion, serve the next ones.
    own = not ray.is_initialized()
    if own:
        connect(opts)
    lap("connect")
    try:
        check_fits(opts)
        parts = run_parts(opts, plan, command, say)
        lap("parts")
    finally:
        if own:
            ray.shutdown()
    lap("shutdown")
    total = sum(p["bytes"] for p in parts)
    say(f"{len(parts)} part(s), {total / 1e6:.2f} MB in {timings['parts']:.2f} s; finishing")
    run_here(command + ["--finish", "--force"] + ["--verify"] * opts.verify + ["--quiet"] * opts.quiet, "finishing")
    lap("finish")
    timings["total"] = round(time.monotonic() - start, 6)
    timings["per_part"] = parts
    return timings


def interrupt(signum, frame):
    """SIGTERM (a scheduler cancelling the driver) stops the run as Ctrl-C does: the parts are cancelled."""
    raise KeyboardInterrupt


def convert_checkpoint(input, out, parts, flags=(), **options):
    """The driver as a function, for a long-lived Python process (e.g. a service converting uploads): plans, runs the
    parts and finishes as `python -m ckptconv_ray IN OUT --parts N` does, `flags` passed to ckptconv convert and
    `options` named as the command line's (ckptconv=, max_retries=, jobs=, memory=, verify=, force=, quiet=, ...).
    When the caller has connected with ray.init, that connection is used and left open, so Ray's worker processes
    are started once for all conversions; otherwise the call connects (address=, num_cpus=) and disconnects. Returns
    the timings (seconds per step, per-part results); raises DriverError."""
    argv = [str(input), str(out), "--parts", str(parts)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [] if value in (None, False) else [flag, str(value)]
    try:
        opts, rest = parse(argv + [str(f) for f in flags])
    except SystemExit:
        raise DriverError(f"bad options: {argv[3:]} {list(flags)} (argparse's message above)", 2) from None
    opts.handle_sigterm = False
    return convert(opts, rest)


def main(argv=None):
    """The command line: exit 0 when OUT is finished, 1 on a failure (one clear line), 2 on a usage error, 130 when
    interrupted (SIGINT or SIGTERM)."""
    opts, flags = parse(argv)
    opts.handle_sigterm = True
    try:
        timings = convert(opts, flags)
    except DriverError as e:
        print(f"ckptconv_ray: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("ckptconv_ray: interrupted", file=sys.stderr)
        return 130
    if opts.timings:
        with open(opts.timings, "w") as f:
            json.dump(timings, f, indent=2)
    if not opts.quiet:
        print(f"ckptconv_ray: done in {timings['total']:.2f} s (plan {timings['plan']:.2f}, connect "
              f"{timings['connect']:.2f}, parts {timings['parts']:.2f}, finish {timings['finish']:.2f})",
              file=sys.stderr)
    return 0
