"""Benchmark `npx ckptconv convert` reading the bench .pt from a local HTTP URL against the native CLI reading it from disk.

Owns: bench/bench_npx.py. Input: bench_pt.py's cached Qwen2-1.5B-shaped bf16 .pt (~3.55 GB, generated once into
bench/data/). The npm package is packed (`npm pack`) and installed offline into bench/data/npx_app, as a user's
`npx ckptconv` would run it (the CLI compiled for WASI, under Node's WASI; URLs read by its fetcher thread with Range
requests, verbatim ranges written into the output by its writer thread without passing through the module). The file server (the "hub": its CPU and memory are not the tool's) is nginx on 127.0.0.1 when the machine
has it (`apt-get install nginx-light`; sendfile, as hubs and CDNs serve files), else web/test/rangeserver.mjs in its
own Node process, which spends about 1 CPU-second per GB itself and so takes CPU from the tool on a small machine
(`--server node` picks it). Tools, each into an emptied scratch folder, interleaved per repetition and mode
(bench_zero.measure):
  cp          cp of the .pt (the bytes every tool reads and writes)
  native      target/release/ckptconv convert SRC OUT --quiet
  npx url     bench/data/npx_app/node_modules/.bin/ckptconv convert http://127.0.0.1:PORT/SRC OUT --quiet
  npx file    the same with the path (what Node's WASI costs without HTTP)
Modes: hot = the input read once untimed, `sync`, then the tool; disk = `sync`, page cache dropped (echo 3 >
drop_caches, else posix_fadvise DONTNEED of the input), the tool and its `sync` timed. Peak RSS is GNU time's %M of
the tool's process (Node's, for npx). On the first repetition every output must equal native's (SHA-256 per file).
Target (issue "Embedding in model hubs"): npx url <= 1.5x native wall, <= 128 MiB peak RSS. Medians, then JSON.

Run:  .venv/bin/python bench/bench_npx.py [--reps 3] [--modes hot,disk] [--server nginx|node]
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_io  # noqa: E402
import bench_pt  # noqa: E402
import bench_zero  # noqa: E402  (measure, summarize, print_table)
from bench_pt import DATA, REPO, SRC, bench_args, generate_in_child  # noqa: E402

bench_pt.RSS_FILE = bench_io.RSS_FILE = DATA / "rss_npx.txt"  # our own, so a concurrent bench cannot clobber it
LOG = DATA / "bench_npx.log"
APP = DATA / "npx_app"
TARGET_RATIO = 1.5
TARGET_RSS_MIB = 128


def install_package():
    """npm pack the repo and install the tarball offline into a fresh APP; returns its `ckptconv` bin."""
    subprocess.run(["rm", "-rf", str(APP)], check=True)
    APP.mkdir(parents=True)
    packed = json.loads(subprocess.run(["npm", "pack", "--json", "--pack-destination", str(APP)], cwd=REPO,
                                       check=True, capture_output=True, text=True).stdout)
    (APP / "package.json").write_text(json.dumps({"name": "bench", "private": True}))
    subprocess.run(["npm", "install", str(APP / packed[0]["filename"]), "--offline", "--no-audit", "--no-fund"],
                   cwd=APP, check=True, capture_output=True)
    return APP / "node_modules" / ".bin" / "ckptconv"


NGINX_CONF = """daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d}; server {{ listen 127.0.0.1:{port}; root {root}; }} }}
"""


def start_server(kind):
    """(process, base URL) of a file server for SRC's folder: nginx or web/test/rangeserver.mjs."""
    if kind == "nginx":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d = DATA / "nginx"
        d.mkdir(exist_ok=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, root=SRC.parent))
        proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")])
        base = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, base
            except OSError:
                time.sleep(0.05)
        raise SystemExit("nginx did not start")
    proc = subprocess.Popen(["node", str(REPO / "web/test/rangeserver.mjs"), str(SRC.parent)], stdout=subprocess.PIPE,
                            text=True)
    base = proc.stdout.readline().strip()
    assert base.startswith("http://127.0.0.1:"), base
    return proc, base


def main():
    args = bench_args(__doc__, "out_npx", extra=[
        ("--modes", dict(default="hot,disk", help="hot, disk or both")),
        ("--server", dict(default="nginx" if shutil.which("nginx") else "node", help="nginx or node")),
    ])
    generate_in_child()
    modes = args.modes.split(",")
    assert set(modes) <= {"hot", "disk"}, modes
    npx = install_package()
    server, base = start_server(args.server)
    try:
        url = base + SRC.name
        out = Path(args.out)
        tools = {
            "cp": ["cp", str(SRC), str(out / SRC.name)],
            "native": [args.ckptconv, "convert", str(SRC), str(out / "hf"), "--quiet"],
            "npx url": [str(npx), "convert", url, str(out / "hf"), "--quiet"],
            "npx file": [str(npx), "convert", str(SRC), str(out / "hf"), "--quiet"],
        }
        check = bench_zero.same_output_as("native", modes)
        size = SRC.stat().st_size
        print(f"input {SRC.name}: {size / 1e9:.2f} GB; {args.reps} reps of modes {modes}; served by {args.server} at {url}; "
              f"load {bench_io.loadavg():.1f}", flush=True)
        LOG.write_text("")
        runs, drop_how = bench_zero.measure(tools, modes, args.reps, out, {n: [(SRC, None)] for n in tools}, [SRC],
                                            check, LOG)
    finally:
        server.terminate()
        server.wait()
    ratios = [("npx url", "native"), ("npx file", "native"), ("native", "cp"), ("npx url", "cp")]
    med, rat = bench_zero.summarize(runs, modes, ratios)
    print(f"\ncache drop: {drop_how}; peak RSS: GNU time %M of the tool's process")
    bench_zero.print_table(med, rat, ["native", "cp"])
    verdict = {}
    for mode in modes:
        r = rat[f"{mode}: npx url / native"]["of_medians"]
        rss = med[(mode, "npx url")]["max_rss_mib"]
        verdict[mode] = {"wall_ratio": r, "wall_target_met": r <= TARGET_RATIO, "max_rss_mib": rss,
                         "rss_target_met": rss <= TARGET_RSS_MIB}
        print(f"{mode}: npx url / native {r:.2f}x (target <= {TARGET_RATIO}x: {'met' if r <= TARGET_RATIO else 'NOT met'}),"
              f" peak RSS {rss:.1f} MiB (target <= {TARGET_RSS_MIB}: {'met' if rss <= TARGET_RSS_MIB else 'NOT met'})")
    result = {"input": str(SRC), "input_bytes": size, "url": url, "server": args.server, "reps": args.reps, "cache_drop": drop_how,
              "median": {f"{m}: {n}": v for (m, n), v in med.items()}, "ratios": rat, "verdict": verdict,
              "runs": {f"{m}: {n}": v for (m, n), v in runs.items()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "node": os.popen("node --version").read().strip()}
    (DATA / "npx_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
