"""Benchmark scale-out: the bench .pt converted as 1, 2 and 4 parts through Ray against one `ckptconv convert`, and
`--jobs` 1/2/4 writing to a tmpfs folder.

Owns: bench/bench_parts.py. Input: bench_pt.py's cached Qwen2-1.5B-shaped bf16 .pt (~3.55 GB, generated once into
bench/data/), converted with `--max-shard-size 500MB` (8 shards of 0.25-0.5 GB) by every tool, so the outputs are the
same files. A local Ray cluster is started once (`ray start --head`, 127.0.0.1, no dashboard; its start-up time is
reported, not counted: a cluster that converts is already running), and the driver connects to it (`--address`).
Tools, each into an emptied scratch folder, interleaved per repetition and mode (bench_zero.measure):
  cp        cp of the .pt (the bytes every tool reads and writes)
  single    ckptconv convert SRC OUT --max-shard-size 500MB --quiet
  ray N     python -m ckptconv_ray SRC OUT --parts N --address ADDR --max-shard-size 500MB --quiet (N = 1, 2, 4):
            planning, connecting, the parts as Ray tasks, the finishing step; its --timings give the breakdown
Modes: hot = the input read once untimed, then the tool; disk = `sync`, page cache dropped, the tool and its `sync`
timed. Peak RSS is GNU time's %M of the tool's process (for Ray, the driver's; the parts' ckptconv processes are
Ray's workers' children). On the first repetition every output must equal single's (SHA-256 per file).
Then the same conversion through a driver that is connected already (`ckptconv_ray.convert_checkpoint` in a
long-lived process, as a conversion service runs it: Ray's workers started by an untimed first conversion),
interleaved with `single` again. Then `--jobs`: `ckptconv convert --jobs J` (J = 1, 2, 4) into a folder on /dev/shm (tmpfs), the input hot: how far one
process scales when the disk is not the limit.
Target (issue "Scale-out"): Ray at N = 1 within 10% of one process (reported for both drivers). Medians, then JSON into bench/data/parts_result.json.

Run:  .venv/bin/python bench/bench_parts.py [--reps 3] [--modes hot,disk]
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_io  # noqa: E402
import bench_pt  # noqa: E402
import bench_zero  # noqa: E402  (measure, summarize, print_table)
from bench_pt import DATA, REPO, SRC, bench_args, generate_in_child  # noqa: E402

bench_pt.RSS_FILE = bench_io.RSS_FILE = DATA / "rss_parts.txt"  # our own, so a concurrent bench cannot clobber it
LOG = DATA / "bench_parts.log"
TIMINGS = DATA / "parts_timings.json"
SHARDS = ["--max-shard-size", "500MB"]
PARTS = [1, 2, 4]
JOBS = [1, 2, 4]
TARGET_OVERHEAD = 0.10
RAY = str(Path(sys.executable).parent / "ray")
# Nothing reported anywhere, the node on loopback (Ray ignores --node-ip-address=127.0.0.1 otherwise), and token
# authentication, which Ray turns on for a head started when ~/.ray/auth_token exists.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
       "PYTHONPATH": str(REPO / "python")}


def start_ray(tmp):
    """Starts a local head node on 127.0.0.1 with this machine's CPUs; returns (address, seconds it took)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"],
                   env=ENV, check=True, capture_output=True)
    return f"127.0.0.1:{port}", time.perf_counter() - t0


def stop_ray():
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)


WARM_SERVER = """import json, subprocess, sys, time, ray, ckptconv_ray
ray.init(address=sys.argv[1], log_to_driver=False)
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    ckptconv_ray.convert_checkpoint(job["in"], job["out"], job["parts"], job["flags"], ckptconv=job["ckptconv"],
                                    quiet=True)
    if job["sync"]:
        subprocess.run(["sync"], check=True)
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
"""


def warm_driver(binary, address, modes, reps, out):
    """One conversion through a driver that is already connected (ckptconv_ray.convert_checkpoint in a long-lived
    process, after one untimed conversion started Ray's workers), interleaved with one `ckptconv convert`, timed as
    bench_zero.measure times them: {(mode, tool): [seconds]}."""
    server = subprocess.Popen([sys.executable, "-c", WARM_SERVER, address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    drop = "disk" in modes and bench_io.can_drop()

    def convert_warm(sync):
        job = {"in": str(SRC), "out": str(out / "hf"), "parts": 1, "flags": SHARDS, "ckptconv": binary, "sync": sync}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the warm driver stopped (see its stderr above)")
        return json.loads(line)["seconds"]

    runs = {(m, t): [] for m in modes for t in ("single", "ray 1 warm")}
    try:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        convert_warm(False)  # starts the job's worker processes
        for rep in range(reps):
            for mode in modes:
                for tool in ("single", "ray 1 warm"):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    if mode == "hot":
                        bench_zero.warm([(SRC, None)])
                    subprocess.run(["sync"], check=True)
                    if mode == "disk" and drop:
                        bench_io.DROP.write_text("3\n")
                    if tool == "single":
                        argv = [binary, "convert", str(SRC), str(out / "hf"), *SHARDS, "--quiet"]
                        secs = (bench_pt.timed(argv) if mode == "hot" else bench_io.timed(argv, {}, False))[0]
                    else:
                        secs = convert_warm(mode == "disk")
                    runs[(mode, tool)].append(secs)
                    print(f"rep {rep + 1}/{reps}  {mode:<4} {tool:<11} {secs:7.2f} s", flush=True)
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        shutil.rmtree(out, ignore_errors=True)
    return runs


def jobs_on_tmpfs(binary, reps):
    """`--jobs J` into /dev/shm, input hot: {J: [seconds]}."""
    out = Path(tempfile.mkdtemp(prefix="ckptconv_jobs_", dir="/dev/shm"))
    runs = {j: [] for j in JOBS}
    try:
        bench_zero.warm([(SRC, None)])
        for rep in range(reps):
            for j in JOBS:
                shutil.rmtree(out / "hf", ignore_errors=True)
                secs, rss = bench_pt.timed([binary, "convert", str(SRC), str(out / "hf"), *SHARDS, "--jobs", str(j),
                                            "--quiet"])
                runs[j].append({"seconds": secs, "peak_rss_mib": rss})
                print(f"rep {rep + 1}/{reps}  --jobs {j} to tmpfs {secs:7.2f} s  {rss:8.1f} MiB", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return runs


def main():
    args = bench_args(__doc__, "out_parts", extra=[
        ("--modes", dict(default="hot,disk", help="hot, disk or both")),
    ])
    generate_in_child()
    modes = args.modes.split(",")
    assert set(modes) <= {"hot", "disk"}, modes
    out = Path(args.out)
    size = SRC.stat().st_size
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    stop_ray()
    address, ray_start = start_ray(ray_tmp)
    driver = [sys.executable, "-m", "ckptconv_ray"]
    tools = {"cp": ["cp", str(SRC), str(out / SRC.name)],
             "single": [args.ckptconv, "convert", str(SRC), str(out / "hf"), *SHARDS, "--quiet"]}
    for n in PARTS:
        tools[f"ray {n}"] = [*driver, str(SRC), str(out / "hf"), "--parts", str(n), "--address", address,
                             "--ckptconv", args.ckptconv, *SHARDS, "--quiet", "--timings", str(TIMINGS)]
    breakdown = {name: [] for name in tools if name.startswith("ray")}
    same_output = bench_zero.same_output_as("single", modes)

    def check(name, rep, mode, folder):
        if name in breakdown:
            breakdown[name].append({"mode": mode, **json.loads(TIMINGS.read_text())})
        same_output(name, rep, mode, folder)

    print(f"input {SRC.name}: {size / 1e9:.2f} GB; {args.reps} reps of modes {modes}; Ray head at {address} "
          f"(started in {ray_start:.1f} s); load {bench_io.loadavg():.1f}", flush=True)
    LOG.write_text("")
    os.environ.update(ENV)  # the driver finds the package and sends no usage stats
    try:
        runs, drop_how = bench_zero.measure(tools, modes, args.reps, out, {n: [(SRC, None)] for n in tools}, [SRC],
                                            check, LOG)
        warm = warm_driver(args.ckptconv, address, modes, args.reps, out)
    finally:
        stop_ray()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ratios = [(f"ray {n}", "single") for n in PARTS] + [("single", "cp")]
    med, rat = bench_zero.summarize(runs, modes, ratios)
    print(f"\ncache drop: {drop_how}; peak RSS: GNU time %M of the tool's process (Ray: the driver's)")
    bench_zero.print_table(med, rat, ["single", "cp"])

    steps = {}
    for name, rows in breakdown.items():
        for mode in modes:
            mine = [r for r in rows if r["mode"] == mode]
            if not mine:
                continue
            part_secs = [p["seconds"] for r in mine for p in r["per_part"]]
            steps[f"{mode}: {name}"] = {
                **{k: statistics.median(r[k] for r in mine) for k in ("plan", "connect", "parts", "shutdown", "finish",
                                                                       "total")},
                "part_seconds_median": statistics.median(part_secs),
                "attempts_max": max((p["attempts"] or 1) for r in mine for p in r["per_part"]),
                "outside_driver": statistics.median(runs[(mode, name)][i]["seconds"] - mine[i]["total"]
                                                    for i in range(len(mine))),
            }
    print("\nRay driver, medians (seconds): plan = --plan-parts on the driver, connect = ray.init, parts = the tasks "
          "(wall), finish = --finish; outside = Python start-up and `import ray`")
    for k, s in steps.items():
        print(f"  {k:<14} plan {s['plan']:.2f}  connect {s['connect']:.2f}  parts {s['parts']:.2f} (a part "
              f"{s['part_seconds_median']:.2f})  shutdown {s['shutdown']:.2f}  finish {s['finish']:.2f}  outside "
              f"{s['outside_driver']:.2f}")
    verdict = {}
    for mode in modes:
        single = med[(mode, "single")]["seconds"]
        over = med[(mode, "ray 1")]["seconds"] / single - 1
        verdict[mode] = {"ray1_overhead": over, "target_met": over <= TARGET_OVERHEAD,
                         "per_part_overhead_s": {n: med[(mode, f"ray {n}")]["seconds"] - single for n in PARTS}}
        print(f"{mode}: Ray at N = 1 is {100 * over:+.1f}% over one process (target <= {100 * TARGET_OVERHEAD:.0f}%: "
              f"{'met' if over <= TARGET_OVERHEAD else 'NOT met'})")

    warm_med = {k: statistics.median(v) for k, v in warm.items()}
    for mode in modes:
        over = warm_med[(mode, "ray 1 warm")] / warm_med[(mode, "single")] - 1
        verdict[mode]["ray1_warm_overhead"] = over
        print(f"{mode}: through a connected driver (convert_checkpoint), Ray at N = 1 is {100 * over:+.1f}% over one "
              f"process ({warm_med[(mode, 'ray 1 warm')]:.2f} s vs {warm_med[(mode, 'single')]:.2f} s; target <= "
              f"{100 * TARGET_OVERHEAD:.0f}%: {'met' if over <= TARGET_OVERHEAD else 'NOT met'})")

    jobs = jobs_on_tmpfs(args.ckptconv, args.reps)
    jmed = {j: statistics.median(r["seconds"] for r in rs) for j, rs in jobs.items()}
    for j in JOBS:
        print(f"--jobs {j} to tmpfs: {jmed[j]:.2f} s ({size / jmed[j] / 1e9:.2f} GB/s, {jmed[1] / jmed[j]:.2f}x --jobs 1), "
              f"peak RSS {max(r['peak_rss_mib'] for r in jobs[j]):.1f} MiB")

    result = {"input": str(SRC), "input_bytes": size, "shards": SHARDS, "reps": args.reps, "cache_drop": drop_how,
              "ray_start_seconds": ray_start, "cpus": os.cpu_count(),
              "median": {f"{m}: {n}": v for (m, n), v in med.items()}, "ratios": rat, "verdict": verdict,
              "ray_steps": steps, "warm_driver": {f"{m}: {t}": v for (m, t), v in warm.items()}, "jobs_tmpfs": {"median_seconds": jmed, "runs": jobs},
              "runs": {f"{m}: {n}": v for (m, n), v in runs.items()}, "ray_breakdown": breakdown,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (DATA / "parts_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("verdict", "ray_steps", "jobs_tmpfs")}))


if __name__ == "__main__":
    main()
