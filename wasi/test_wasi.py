"""The WASI build (target/wasi/ckptconv.wasm, from wasi/build.sh) against the native binary, under wasmtime.

Owns: wasi/test_wasi.py. Shows that
  1. every end-to-end fixture the native suite converts gives byte-identical output files under WASI (same
     command, the input folder mounted as /in and an empty host folder as /out; listings and bytes compared
     recursively), plus --dtype, --max-shard-size, --format pt and dcp-to-pt variants and, when
     tests/fixtures/lora exists, the merge / adapter / pt2hf / openvla_oft commands of tests/e2e/test_lora.py
     (outputs that record a path they were given, e.g. adapter_config.json's base_model_name_or_path, run with
     the same relative paths both ways); inspect prints the same report; content refusals give the same error;
  2. the module cannot reach outside its preopens: host paths, `..` and symlink escapes fail with exit 1, writes
     outside /out fail and create nothing on the host; every hostile / broken input is refused with exit 1 and
     its expected message under a 256 MiB linear-memory cap (134 = a trap, e.g. an allocation over the cap), and
     so is every broken deflated entry of tests/deflated.py, with the native error line;
  3. exit codes under WASI: 0 ok, 1 error, 2 usage;
  4. converting fixtures, and inputs larger than 64 MiB (generated here with torch: .pt incl. --dtype/shards/
     --format pt, DCP, dcp-to-pt, non-contiguous views; the .pt files also re-zipped deflated, as a user would),
     runs within a 64 MiB linear-memory cap (-W max-memory-size, so any runner enforces it) with the same bytes as
     native; run.py also reports the peak.

Runner: env CKPTCONV_WASM_RUNNER (a command line, e.g. "wasmtime run"); else `wasmtime run` when the wasmtime
CLI is on PATH; else `python wasi/run.py` (PyPI wasmtime, same flags). Both are called with the `wasmtime run`
spelling: `--dir HOST::GUEST`, `-W max-memory-size=BYTES`, before the module. Module: env CKPTCONV_WASM
(default target/wasi/ckptconv.wasm); native binary: env CKPTCONV (default target/release/ckptconv).
Run: .venv/bin/python -m pytest wasi   (or with the native suite: pytest tests/e2e wasi)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import manifest  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
PT, DCP, VERL, MG, LORA, MOE = (FIXTURES / d for d in ("pt", "dcp", "verl", "megatron", "lora", "megatron_moe"))
HOSTILE = FIXTURES.parent / "hostile"
INDEX = "model.safetensors.index.json"
MiB = 1 << 20
HOSTILE_CAP = 268435456  # 256 MiB, the brief's cap for hostile inputs
MEMORY_TARGET = 64 * MiB  # the issue's bound on peak linear memory
CANARY = Path("/tmp/ckptconv_hostile_canary")  # what the hostile payloads would create if ever run


def _path_from_env(var, default):
    p = Path(os.environ.get(var, default))
    return p if p.is_absolute() else REPO / p


WASM = _path_from_env("CKPTCONV_WASM", "target/wasi/ckptconv.wasm")
NATIVE = _path_from_env("CKPTCONV", "target/release/ckptconv")


sys.path.insert(0, str(REPO / "wasi"))
from runner import runner_prefix  # noqa: E402  (wasi/runner.py)

RUNNER = runner_prefix()


@pytest.fixture(scope="session", autouse=True)
def built():
    for what, p, how in (("WASI module", WASM, "bash wasi/build.sh"), ("native binary", NATIVE, "cargo build --release")):
        if not p.is_file():
            pytest.fail(f"{what} not found at {p}: run `{how}`")
    # Same source? Both must report the same version (a stale .wasm would make byte comparisons meaningless).
    native = subprocess.run([str(NATIVE), "--version"], capture_output=True, text=True).stdout.strip()
    r = run_wasm(["--version"])
    wasm = r.stdout.strip()
    assert native.split()[-1:] == wasm.split()[-1:], (
        f"native {native!r} vs wasm {wasm!r} (runner {RUNNER}, exit {r.returncode}, stderr {r.stderr[-2000:]!r})"
    )
    if WASM.stat().st_mtime < NATIVE.stat().st_mtime - 60:
        warnings.warn(f"{WASM} is older than {NATIVE}: if the source changed in between, rebuild it (bash wasi/build.sh)")


# --- running -------------------------------------------------------------------------------------------------

def wasm_argv(args, dirs=(), limits=None):
    """The runner command line, spelled as `wasmtime run` spells it (run.py accepts the same)."""
    argv = list(RUNNER)
    for host, guest in dirs:
        argv += ["--dir", f"{host}::{guest}"]
    for k, v in (limits or {}).items():
        argv += ["-W", f"{k}={v}"]
    return argv + [str(WASM)] + [str(a) for a in args]


def run_wasm(args, dirs=(), limits=None, timeout=300, memory_report=None):
    env = dict(os.environ)
    env.pop("CKPTCONV_WASM_MEMORY_REPORT", None)
    if memory_report:
        env["CKPTCONV_WASM_MEMORY_REPORT"] = str(memory_report)
    return subprocess.run(wasm_argv(args, dirs, limits), capture_output=True, text=True, timeout=timeout, env=env)


def run_native(args, timeout=300, cwd=None):
    return subprocess.run([str(NATIVE)] + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


class Arg(str):
    """An argument naming a path inside a mount ("in", "out", or an extra one): HOST_ROOT/rel natively, /MOUNT/rel
    under WASI; or, in relative mode, MOUNT/rel for both (natively from a folder of symlinks MOUNT -> HOST_ROOT)."""

    def __new__(cls, mount, rel=""):
        s = super().__new__(cls, rel)
        s.mount = mount
        return s


def In(rel=""):
    return Arg("in", rel)


def Out(rel=""):
    return Arg("out", rel)


def resolve(args, roots, style):
    """style: "host" (absolute host paths), "guest" (/mount/rel) or "relative" (mount/rel)."""
    res = []
    for a in args:
        if isinstance(a, Arg):
            base = {"host": lambda: str(roots[a.mount]), "guest": lambda: f"/{a.mount}", "relative": lambda: a.mount}[style]()
            res.append(f"{base}/{a}" if a else base)
        else:
            res.append(str(a))
    return res


def tree(root):
    """{relative path: bytes, or None for a folder}, recursively, symlinks not followed."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = None if p.is_dir() and not p.is_symlink() else (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
    return out


def stat_tree(root):
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def first_difference(a, b):
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            return i + next(j for j in range(4096) if a[i + j] != b[i + j])
    return n


def assert_same_tree(native_root, wasm_root, what):
    a, b = tree(native_root), tree(wasm_root)
    assert sorted(a) == sorted(b), (f"{what}: output listings differ\n native only: {sorted(set(a) - set(b))}\n"
                                    f" wasi only: {sorted(set(b) - set(a))}")
    assert a, f"{what}: no output at all"
    for rel in a:
        if a[rel] != b[rel]:
            x, y = a[rel], b[rel]
            if x is None or y is None:
                raise AssertionError(f"{what}: {rel} is a folder on one side only")
            raise AssertionError(f"{what}: {rel} differs: native {len(x)} B, wasi {len(y)} B, first difference at byte "
                                 f"{first_difference(x, y)}")


def both(tmp_path, in_root, args, extra=None, relative=False, limits=None, memory_report=None, timeout=300):
    """Run ckptconv natively and under WASI on the same inputs; both must exit 0 and leave every input mount
    untouched. in_root is mounted as /in, an empty folder as /out, extra {mount: host folder} as /mount.
    relative=True spells every path mount/rel in both runs (natively from a folder of symlinks), for outputs
    that record a path they were given (a PEFT adapter_config's base_model_name_or_path, pt2hf's YAML).
    Returns (native_out_root, wasm_out_root, wasm CompletedProcess)."""
    nat_out, wasm_out = tmp_path / "native", tmp_path / "wasi"
    nat_out.mkdir()
    wasm_out.mkdir()
    inputs = {"in": Path(in_root), **(extra or {})}
    before = {m: stat_tree(h) for m, h in inputs.items()}
    cwd = None
    if relative:
        cwd = tmp_path / "native_view"
        cwd.mkdir()
        for m, h in {**inputs, "out": nat_out}.items():
            (cwd / m).symlink_to(h)
        native_args = resolve(args, None, "relative")
    else:
        native_args = resolve(args, {**inputs, "out": nat_out}, "host")
    n = run_native(native_args, timeout=timeout, cwd=cwd)
    assert n.returncode == 0, f"native {native_args} failed ({n.returncode}):\n{n.stderr[-3000:]}"
    w = run_wasm(resolve(args, None, "relative" if relative else "guest"),
                 dirs=[(h, f"/{m}") for m, h in {**inputs, "out": wasm_out}.items()],
                 limits=limits, memory_report=memory_report, timeout=timeout)
    assert w.returncode == 0, f"wasi {args} failed ({w.returncode}):\n{w.stderr[-3000:]}"
    assert "panicked" not in w.stderr, w.stderr
    assert {m: stat_tree(h) for m, h in inputs.items()} == before, "an input folder changed"
    manifest.record(args, out=nat_out)
    return nat_out, wasm_out, w


# --- 1. same bytes -------------------------------------------------------------------------------------------

def _dirs(parent):
    return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []


def same_bytes_cases():
    """Every conversion tests/e2e checks, as case(id, folder mounted as /in, args, ...)."""
    cases = []
    for src in sorted(PT.glob("*.pt")):
        cases.append(case(f"pt/{src.name}", PT, ["convert", In(src.name), Out("hf")]))
    cases.append(case("sample/full_weights.pt", FIXTURES / "sample", ["convert", In("full_weights.pt"), Out("hf")]))

    ws2 = DCP / "fsdp2_ws2"
    dcp_folders = [("fsdp2_ws2/global_step_1/actor/dcp_checkpoint", ws2, "global_step_1/actor/dcp_checkpoint"),
                   ("fsdp2_ws2/global_step_1", ws2, "global_step_1"),
                   ("fsdp2_ws2/global_step_1/actor", ws2, "global_step_1/actor")]
    for group in ("layouts", "variants"):
        dcp_folders += [(f"{group}/{d.name}", d, "") for d in _dirs(DCP / group)]
    for ident, root, rel in dcp_folders:
        cases.append(case(f"dcp/{ident}", root, ["convert", In(rel), Out("hf")]))
        cases.append(case(f"dcp/{ident}:dcp-to-pt", root, ["dcp-to-pt", "--dcp_path", In(rel), "--output_path", Out("model.pt")]))
    cases.append(case("dcp/fsdp2_ws2:format-pt", ws2, ["convert", In("global_step_1/actor/dcp_checkpoint"), Out("hf"), "--format", "pt"]))
    cases.append(case("dcp/fsdp2_ws2:bf16", ws2, ["convert", In("global_step_1/actor/dcp_checkpoint"), Out("hf"), "--dtype", "bf16"]))
    cases.append(case("dcp/fsdp2_ws2:shards", ws2, ["convert", In("global_step_1/actor/dcp_checkpoint"), Out("hf"),
                                                "--max-shard-size", "100KB"]))
    cases.append(case("dcp/mesh2d_ws4:prefix-empty", DCP / "layouts" / "mesh2d_ws4", ["convert", In(""), Out("hf"), "--prefix", ""]))

    for ident, root, rel in [("verl/fsdp2_ws2", VERL / "fsdp2_ws2", ""), ("verl/fsdp2_ws2/actor", VERL / "fsdp2_ws2", "actor"),
                             ("verl/layouts_ws4", VERL / "layouts_ws4", "")]:
        cases.append(case(ident, root, ["convert", In(rel), Out("hf")]))

    mg_manifest = json.loads((MG / "manifest.json").read_text()) if (MG / "manifest.json").exists() else {}
    for name in sorted(mg_manifest):
        cases.append(case(f"megatron/{name}", MG / name, ["mg2hf", In("actor"), Out("hf"), In("base_hf")]))
        if mg_manifest[name].get("dist"):  # the same model saved as torch_dist
            cases.append(case(f"megatron/{name}:torch_dist", MG / name, ["mg2hf", In("actor_dist"), Out("hf"), In("base_hf")]))
    for root in (MOE, FIXTURES / "megatron_mla"):  # Mixture-of-Experts (and DeepSeek-V3's MLA), split by EP too
        moe_manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else {}
        for name in sorted(moe_manifest):
            cases.append(case(f"{root.name}/{name}", root / name, ["mg2hf", In("actor"), Out("hf"), In("base_hf")]))
            if moe_manifest[name].get("dist"):
                cases.append(case(f"{root.name}/{name}:torch_dist", root / name,
                                  ["mg2hf", In("actor_dist"), Out("hf"), In("base_hf")]))
    cases.append(case("megatron/qwen2_tp2_pp2:convert-base-shards", MG / "qwen2_tp2_pp2",
                  ["convert", In("actor"), Out("hf"), "--base", In("base_hf"), "--max-shard-size", "100KB"]))
    cases.append(case("megatron/qwen2_tp2:bf16", MG / "qwen2_tp2", ["convert", In("actor"), Out("hf"), "--base", In("base_hf"), "--dtype", "bf16"]))

    # Hugging Face sets, DeepSpeed ZeRO and FP8 (tests/fixtures/make_input_fixtures.py): a folder, an index, one
    # shard standing for its set, casts with config.json's dtype, tied copies, ZeRO-3 partitions, FP8 dequant.
    hs, ds, f8 = FIXTURES / "hf_sets", FIXTURES / "deepspeed" / "zero3_bf16_w3", FIXTURES / "fp8" / "block128_st"
    q = hs / "qwen2_bin_sharded"
    cases += [
        case("hf_sets/qwen2_bin_sharded", q, ["convert", In(""), Out("hf")]),
        case("hf_sets/qwen2_bin_sharded:bf16", q, ["convert", In(""), Out("hf"), "--dtype", "bf16"]),
        case("hf_sets/qwen2_bin_sharded:index", q, ["convert", In("pytorch_model.bin.index.json"), Out("hf")]),
        case("hf_sets/qwen2_bin_sharded:shard", q, ["convert", In("pytorch_model-00002-of-00004.bin"), Out("hf")]),
        case("hf_sets/t5_bin_sharded:shards", hs / "t5_bin_sharded", ["convert", In(""), Out("hf"), "--max-shard-size", "100KB"]),
        case("deepspeed/zero3_bf16_w3", ds, ["convert", In("ckpt"), Out("hf"), "--base", In("hf")]),
        case("deepspeed/zero3_bf16_w3:step-bf16", ds, ["convert", In("ckpt/global_step2"), Out("hf"), "--dtype", "bf16"]),
        case("fp8/block128_st", f8, ["convert", In(""), Out("hf")]),
        case("fp8/block128_st:bf16", f8, ["convert", In(""), Out("hf"), "--dtype", "bf16"]),
    ]

    qwen = "qwen2_tiny_full_weights.pt"
    for flags, tag in [(["--dtype", "bf16"], "bf16"), (["--dtype", "fp16"], "fp16"), (["--max-shard-size", "20KB"], "shards"),
                       (["--format", "pt"], "format-pt"), (["--format", "pt", "--dtype", "bf16"], "format-pt-bf16")]:
        cases.append(case(f"pt/{qwen}:{tag}", PT, ["convert", In(qwen), Out("hf")] + flags))
    cases.append(case("pt/dtypes_all.pt:bf16", PT, ["convert", In("dtypes_all.pt"), Out("hf"), "--dtype", "bf16"]))
    cases.append(case("pt/lightning_style.pt:prefix-empty", PT, ["convert", In("lightning_style.pt"), Out("hf"), "--prefix", ""]))
    # A config class off the allowlist, accepted by the user's --allow-global (issue #16).
    cases.append(case("trust/simple_namespace_config.pt:allow-global", FIXTURES / "trust",
                      ["convert", In("simple_namespace_config.pt"), Out("hf"), "--allow-global", "types.SimpleNamespace"]))
    return cases + lora_cases()


def _copy_base_with_adapter_config(tmp_path):
    base = tmp_path / "base_with_adapter_config"
    shutil.copytree(LORA / "base_qwen2", base)
    shutil.copy(LORA / "lora_path" / "adapter_config.json", base)
    return {"base": base}


def _pt2hf_config(ckpt, model, lora, extra=None, beside=False):
    """RLinf's fsdp_model_convertor.yaml with its /path/to placeholders replaced by relative paths (the same text
    for both runs), in a folder mounted as /cfg; beside=True also puts model/openvla_oft.yaml next to it."""
    def setup(tmp_path):
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        text = (LORA / "configs" / "fsdp_model_convertor.yaml").read_text()
        subst = {"/path/to/full_weights.pt": ckpt, "/path/to/save": "out/save",
                 "/path/to/Openvla-oft-SFT-libero-goal-traj1": model, "/path/to/lora_adapter": lora, **(extra or {})}
        for old, new in subst.items():
            assert old in text, f"{old!r} not in RLinf's YAML"
            text = text.replace(old, new)
        (cfg / "c.yaml").write_text(text)
        if beside:
            (cfg / "model").mkdir()
            shutil.copy(LORA / "configs" / "model" / "openvla_oft.yaml", cfg / "model" / "openvla_oft.yaml")
        return {"cfg": cfg}
    return setup


def lora_cases():
    """The commands of tests/e2e/test_lora.py on the committed fixtures (when tests/fixtures/lora exists)."""
    if not (LORA / "full_weights.pt").exists():
        return []
    ckpt, bf16, tied = In("full_weights.pt"), In("full_weights_bf16.pt"), In("full_weights_tied.pt")
    base, lp = In("base_qwen2"), In("lora_path")
    conv = lambda src, *rest: ["convert", src, Out("hf"), *rest]
    c = [
        case("lora/merge-lora-path", LORA, conv(ckpt, "--base", base, "--lora-path", lp)),
        case("lora/merge-flags", LORA, conv(ckpt, "--base", base, "--lora-alpha", "8", "--lora-r", "4")),
        case("lora/merge-base-adapter-config", LORA, conv(ckpt, "--base", Arg("base")), setup=_copy_base_with_adapter_config),
        case("lora/merge-default-alpha", LORA, conv(ckpt, "--base", base)),
        case("lora/merge-no-base", LORA, conv(ckpt, "--lora-alpha", "8")),
        case("lora/merge-explicit", LORA, conv(ckpt, "--lora-alpha", "8", "--lora", "merge")),
        case("lora/merge-bf16", LORA, conv(bf16, "--base", base, "--lora-path", lp)),
        case("lora/merge-to-bf16", LORA, conv(ckpt, "--base", base, "--lora-path", lp, "--dtype", "bf16")),
        case("lora/merge-to-fp16", LORA, conv(ckpt, "--base", base, "--lora-path", lp, "--dtype", "fp16")),
        case("lora/merge-bf16-to-fp32", LORA, conv(bf16, "--base", base, "--lora-path", lp, "--dtype", "fp32")),
        case("lora/merge-lora-path-only", LORA, conv(ckpt, "--lora-path", lp)),
        case("lora/merge-tied", LORA, conv(tied, "--base", In("base_qwen2_tied"), "--lora-path", lp)),
        case("lora/merge-shards", LORA, conv(ckpt, "--base", base, "--lora-path", lp, "--max-shard-size", "50KB")),
        case("lora/adapter-base", LORA, conv(ckpt, "--base", base, "--lora", "adapter", "--lora-path", lp), relative=True),
        case("lora/adapter-alpha-flag", LORA, conv(ckpt, "--lora", "adapter", "--lora-alpha", "8")),
        case("lora/adapter-bf16", LORA, conv(bf16, "--lora", "adapter", "--lora-path", lp)),
        case("lora/pt2hf-rlinf-yaml", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml")], relative=True,
             setup=_pt2hf_config("in/full_weights.pt", "in/base_qwen2", "in/lora_path")),
        case("lora/pt2hf-lora-path-null", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml")], relative=True,
             setup=_pt2hf_config("in/full_weights.pt", "in/base_qwen2", "null", {"lora_rank: 32": "lora_rank: 4"})),
        case("lora/pt2hf-alpha-override", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml"), "--lora-alpha", "8"], relative=True,
             setup=_pt2hf_config("in/full_weights.pt", "in/base_qwen2", "null", {"lora_rank: 32": "lora_rank: 4"})),
        case("lora/pt2hf-adapter-override", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml"), "--lora", "adapter"], relative=True,
             setup=_pt2hf_config("in/full_weights.pt", "in/base_qwen2", "in/lora_path", {"lora_rank: 32": "lora_rank: 4"})),
        case("lora/pt2hf-adapter", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml")], relative=True,
             setup=_pt2hf_config("in/full_weights.pt", "in/base_qwen2", "in/lora_path",
                                 {"merge_lora_weighs: True": "merge_lora_weighs: False"})),
        case("lora/pt2hf-openvla-defaults-beside", LORA, ["pt2hf", "--config", Arg("cfg", "c.yaml")], relative=True,
             setup=_pt2hf_config("in/openvla_toy/full_weights.pt", "in/openvla_toy/base", "null", {"lora_rank: 32": "lora_rank: 8"},
                                 beside=True)),
    ]
    if (LORA / "openvla_toy" / "full_weights.pt").exists():
        for film in (False, True):
            for proprio in (False, True):
                flags = ["--model-type", "openvla_oft"] + ["--use-film"] * film + ["--use-proprio"] * proprio
                c.append(case(f"lora/openvla_oft-film{int(film)}-proprio{int(proprio)}", LORA / "openvla_toy",
                              conv(In("full_weights.pt"), "--base", In("base"), *flags)))
    return c


def case(ident, in_root, args, relative=False, setup=None):
    return {"id": ident, "in_root": in_root, "args": args, "relative": relative, "setup": setup}


CASES = same_bytes_cases()


@pytest.mark.parametrize("c", [pytest.param(c, id=c["id"]) for c in CASES])
def test_same_bytes(tmp_path, c):
    extra = c["setup"](tmp_path) if c["setup"] else None
    nat, wasm, _ = both(tmp_path, c["in_root"], c["args"], extra=extra, relative=c["relative"])
    assert_same_tree(nat, wasm, " ".join(c["args"]))


INSPECT = [("pt/qwen2_tiny_full_weights.pt", PT, ["inspect", In("qwen2_tiny_full_weights.pt")]),
           ("dcp/fsdp2_ws2", DCP / "fsdp2_ws2", ["inspect", In("global_step_1/actor/dcp_checkpoint")]),
           ("verl/layouts_ws4", VERL / "layouts_ws4", ["inspect", In("")]),
           ("megatron/qwen2_tp2_pp2", MG / "qwen2_tp2_pp2", ["inspect", In("actor"), "--base", In("base_hf")]),
           ("megatron_moe/qwen3moe_ep2_pp2", MOE / "qwen3moe_ep2_pp2", ["inspect", In("actor"), "--base", In("base_hf")])]


@pytest.mark.parametrize("in_root,args", [c[1:] for c in INSPECT], ids=[c[0] for c in INSPECT])
def test_inspect_same_text(in_root, args):
    """inspect prints the same report under WASI, the input path aside."""
    n = run_native(resolve(args, {"in": in_root}, "host"))
    w = run_wasm(resolve(args, None, "guest"), dirs=[(in_root, "/in")])
    assert n.returncode == 0 and w.returncode == 0, (n.stderr, w.stderr)
    norm = lambda s, root: s.replace(str(root).rstrip("/") + "/", "/in/").replace(str(root), "/in")
    assert norm(n.stdout, in_root) == w.stdout
    assert norm(n.stderr, in_root) == w.stderr


SCAN = [("sample", FIXTURES / "sample", "full_weights.pt", 0),
        ("trust", FIXTURES / "trust", "simple_namespace_config.pt", 1)]


@pytest.mark.parametrize("root,rel,code", [c[1:] for c in SCAN], ids=[c[0] for c in SCAN])
def test_scan_same_report(root, rel, code):
    """scan prints the same report and exits the same way under WASI, the input path aside."""
    n = run_native(["scan", str(root / rel), "--json"])
    w = run_wasm(["scan", f"/in/{rel}", "--json"], dirs=[(root, "/in")])
    assert n.returncode == w.returncode == code, (n.stderr, w.stderr)
    assert n.stdout.replace(str(root) + "/", "/in/") == w.stdout
    assert json.loads(w.stdout)["globals"], w.stdout


# --- 2. sandbox ----------------------------------------------------------------------------------------------

def assert_error(r, *needles):
    assert r.returncode == 1, f"exit {r.returncode} (want 1)\nstderr:\n{r.stderr[-3000:]}"
    assert "panicked" not in r.stderr and "wasm trap" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, f"stderr does not mention {n!r}:\n{r.stderr}"


def test_host_path_not_visible():
    r = run_wasm(["inspect", "/etc/passwd"], dirs=[(PT, "/in")])
    assert_error(r, "/etc/passwd")


def test_host_path_not_visible_convert(tmp_path):
    r = run_wasm(["convert", "/etc/passwd", "/out/hf"], dirs=[(PT, "/in"), (tmp_path, "/out")])
    assert_error(r, "/etc/passwd")
    assert list(tmp_path.iterdir()) == []


def test_absolute_host_path_of_a_real_fixture_not_visible(tmp_path):
    """The host path of a file that exists (and converts natively) means nothing inside the sandbox."""
    src = PT / "parameters.pt"
    r = run_wasm(["convert", src, "/out/hf"], dirs=[(FIXTURES / "sample", "/in"), (tmp_path, "/out")])
    assert_error(r, str(src))
    assert list(tmp_path.iterdir()) == []


def test_dotdot_escape_from_in(tmp_path):
    """/in is tests/fixtures/pt; /in/../sample/full_weights.pt exists on the host but not in the sandbox."""
    assert (PT / ".." / "sample" / "full_weights.pt").exists()
    r = run_wasm(["convert", "/in/../sample/full_weights.pt", "/out/hf"], dirs=[(PT, "/in"), (tmp_path, "/out")])
    assert_error(r, "full_weights.pt")
    assert list(tmp_path.iterdir()) == []


def test_symlink_escape_from_in(tmp_path):
    """A symlink inside the mount that points at a host file outside it is not followed out."""
    mount = tmp_path / "in"
    mount.mkdir()
    (mount / "abs.pt").symlink_to(PT / "parameters.pt")
    (mount / "rel.pt").symlink_to(os.path.relpath(PT / "parameters.pt", mount))
    (mount / "dir").symlink_to(PT)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("abs.pt", "rel.pt", "dir/parameters.pt"):
        assert run_native(["inspect", mount / name]).returncode == 0  # the links work on the host
        r = run_wasm(["convert", f"/in/{name}", f"/out/{name.replace('/', '_')}"], dirs=[(mount, "/in"), (out, "/out")])
        assert_error(r, name)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("dest", ["/etc/ckptconv_wasi_probe", "/out/../escaped", "/out/sub/../../escaped", "/escaped", "/"])
def test_output_outside_out_refused(tmp_path, dest):
    """The output may only go under a preopen: nothing is created on the host outside the out folder. (/in itself
    is writable: `wasmtime run --dir` has no read-only spelling, so the input mount is protected by convention
    only; both() checks every conversion leaves it untouched.)"""
    host_probe = Path("/etc/ckptconv_wasi_probe")
    assert not host_probe.exists()
    outer = tmp_path / "outer"
    out = outer / "out"
    out.mkdir(parents=True)
    mount_in = tmp_path / "in"
    mount_in.mkdir()
    shutil.copy(PT / "parameters.pt", mount_in / "parameters.pt")
    before_in = stat_tree(mount_in)
    r = run_wasm(["convert", "/in/parameters.pt", dest], dirs=[(mount_in, "/in"), (out, "/out")])
    assert_error(r)
    assert not host_probe.exists(), "created a file under the host's /etc"
    assert sorted(p.name for p in outer.iterdir()) == ["out"], f"created {sorted(p.name for p in outer.iterdir())} outside /out"
    assert stat_tree(mount_in) == before_in
    assert not list(out.rglob("*.safetensors")), "wrote output"
    assert not Path("/escaped").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("dest", ["/out/../escaped.pt", "/etc/ckptconv_wasi_probe.pt"])
def test_dcp_to_pt_outside_out_refused(tmp_path, dest):
    outer = tmp_path / "outer"
    out = outer / "out"
    out.mkdir(parents=True)
    r = run_wasm(["dcp-to-pt", "--dcp_path", "/in", "--output_path", dest],
                 dirs=[(DCP / "layouts" / "shard1_ws2", "/in"), (out, "/out")])
    assert_error(r)
    assert sorted(p.name for p in outer.iterdir()) == ["out"] and list(out.iterdir()) == []
    assert not Path("/etc/ckptconv_wasi_probe.pt").exists()


def test_base_outside_preopens_refused(tmp_path):
    """--base pointing at a host folder is refused too (its config is read, its files copied)."""
    r = run_wasm(["mg2hf", "/in/actor", "/out/hf", MG / "qwen2_tp2" / "base_hf"], dirs=[(MG / "qwen2_tp2", "/in"), (tmp_path, "/out")])
    assert_error(r, "base_hf")
    assert not list(tmp_path.rglob("*.safetensors"))


sys.path.insert(0, str(HOSTILE))
import corpus  # noqa: E402  (tests/hostile/corpus.py: every hostile input, its command and expected error kind)
import generated  # noqa: E402  (tests/hostile/generated.py: hostile inputs built at test time)


@pytest.mark.parametrize("case", corpus.cases(), ids=lambda c: c.id)
def test_hostile_refused_under_cap(tmp_path, case):
    """Every input of the hostile corpus, refused as natively (tests/e2e/test_hostile.py) under a 256 MiB
    linear-memory cap: exit 1 with the same `error[KIND]:` line as the native binary (host folders spelled as
    their mounts), never a trap (134) from allocating past the cap, nothing left in /out, no payload run."""
    CANARY.unlink(missing_ok=True)
    out, native_out = tmp_path / "out", tmp_path / "native"
    out.mkdir()
    native_out.mkdir()
    r = run_wasm(case.argv(f"/in/{case.path.name}", "/out/hf"), dirs=[(case.path.parent, "/in"), (out, "/out")],
                 limits={"max-memory-size": HOSTILE_CAP}, timeout=120)
    assert r.returncode == 1, f"exit {r.returncode} (134 = trap), stderr:\n{r.stderr[-3000:]}"
    assert "panicked" not in r.stderr and "trap" not in r.stderr and "internal error" not in r.stderr, r.stderr
    line = last_error(r.stderr, {})
    assert line.startswith(f"ckptconv: error[{case.kind}]: "), f"expected kind {case.kind} ({case.why}):\n{line}"
    n = run_native(case.argv(case.path, native_out / "hf"), timeout=120)
    native = last_error(n.stderr, {"in": case.path.parent, "out": native_out})
    os_error = re.compile(r" \(os error \d+\).*$")  # errno values differ (WASI's ENOENT is 44) and WASI adds a hint
    assert os_error.sub("", line) == os_error.sub("", native), "WASI and native errors differ"
    assert not [p for p in out.rglob("*") if p.is_file()], "output left behind"
    assert not CANARY.exists(), "a hostile payload was executed"


def test_zstd_decode_budget_under_cap(tmp_path):
    """32 zstd DCP items that each stay under 1024x but together decode 1.3 GB (tests/hostile/generated.py): the
    checkpoint's decode budget refuses them under the 256 MiB cap, with the native error line."""
    generated.many_inflating_zstd_items(tmp_path / "dcp")
    out, native_out = tmp_path / "out", tmp_path / "native"
    out.mkdir()
    r = run_wasm(["convert", "/in", "/out/hf"], dirs=[(tmp_path / "dcp", "/in"), (out, "/out")],
                 limits={"max-memory-size": HOSTILE_CAP}, timeout=300)
    assert r.returncode == 1, f"exit {r.returncode} (134 = trap), stderr:\n{r.stderr[-3000:]}"
    line = last_error(r.stderr, {})
    assert line.startswith("ckptconv: error[limit]: ") and "zstd items decode to more than 64 times" in line, line
    native = last_error(run_native(["convert", tmp_path / "dcp", native_out]).stderr, {"in": tmp_path / "dcp"})
    assert line == native, "WASI and native errors differ"
    assert not [p for p in out.rglob("*") if p.is_file()], "output left behind"


def refused_both_ways(tmp_path, in_dir, name, why):
    """`convert /in/NAME /out/hf` under WASI (256 MiB cap) and natively: exit 1 under WASI with nothing left in
    /out; returns (the WASI error line, the native one, with host paths spelled as in the guest)."""
    out, native_out = tmp_path / "out", tmp_path / "native"
    out.mkdir()
    native_out.mkdir()
    r = run_wasm(["convert", f"/in/{name}", "/out/hf"], dirs=[(in_dir, "/in"), (out, "/out")],
                 limits={"max-memory-size": HOSTILE_CAP}, timeout=120)
    assert r.returncode == 1, f"{name} ({why}): exit {r.returncode} (134 = trap), stderr:\n{r.stderr[-3000:]}"
    assert not [p for p in out.rglob("*") if p.is_file()], "output left behind"
    native = last_error(run_native(["convert", in_dir / name, native_out / "hf"]).stderr, {"in": in_dir, "out": native_out})
    return last_error(r.stderr, {}), native


import deflated  # noqa: E402  (tests/deflated.py: a real torch.save re-zipped deflated, and broken copies)


@pytest.fixture(scope="module")
def deflated_files(tmp_path_factory):
    return deflated.write_all(tmp_path_factory.mktemp("deflated"))


def test_deflated_same_bytes_within_64mib(tmp_path, deflated_files):
    """A torch.save re-zipped with zipfile ZIP_DEFLATED (every entry, data.pkl too): the same output bytes as
    natively under the 64 MiB cap, and as the stored original gives."""
    report = tmp_path / "peak"
    nat, wasm, _ = both(tmp_path, deflated_files, ["convert", In("deflated.pt"), Out("hf")],
                        limits={"max-memory-size": MEMORY_TARGET}, memory_report=report)
    assert_same_tree(nat, wasm, "deflated.pt")
    original = tmp_path / "original"
    r = run_native(["convert", deflated_files / "original.pt", original])
    assert r.returncode == 0, r.stderr
    assert tree(original) == tree(nat / "hf"), "the deflated copy converts to other bytes than the original"
    peak = peak_of(report)
    if peak is not None:
        assert peak <= MEMORY_TARGET


@pytest.mark.parametrize("file", sorted(deflated.BROKEN))
def test_deflated_broken_entry_refused_as_natively(tmp_path, deflated_files, file):
    """A deflated entry that lies about its size, fails its CRC-32 or is cut short: exit 1 under the 256 MiB cap with
    the native error line (naming the file and the entry), nothing left in /out."""
    suffix, why, phrase = deflated.BROKEN[file]
    line, native = refused_both_ways(tmp_path, deflated_files, file, why)
    assert line.startswith("ckptconv: error[zip]: ") and f"/in/{file}" in line, line
    assert f"entry 'archive/{suffix}'" in line and phrase in line.lower(), line
    assert native == line, "WASI and native errors differ"


import differential  # noqa: E402  (tests/hostile/differential.py: inputs that Python's readers read otherwise)


@pytest.mark.parametrize("case", differential.cases(), ids=lambda c: c.name)
def test_differential_refused_as_natively(tmp_path, case):
    """Every parser-differential input (tests/e2e/test_differential.py shows what Python reads from each) is
    refused under WASI with the native error line, nothing left in /out."""
    src = tmp_path / "in"
    src.mkdir()
    path = case.build(src)
    line, native = refused_both_ways(tmp_path, src, path.name, case.why)
    assert line.startswith(f"ckptconv: error[{case.kind}]: "), f"expected kind {case.kind} ({case.why}):\n{line}"
    assert line == native, "WASI and native errors differ"


def test_hostile_inspect_refused_under_cap():
    r = run_wasm(["inspect", "/in/zip_os_system.pt"], dirs=[(HOSTILE, "/in")], limits={"max-memory-size": HOSTILE_CAP})
    assert_error(r, "os.system")


import terminal  # noqa: E402  (tests/hostile/terminal.py: names and structures that would drive a terminal)


@pytest.fixture(scope="module")
def terminal_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("terminal")
    terminal.names_checkpoint(d / f"in{terminal.PAYLOAD}.pt")
    terminal.colliding_names(d / "collide.pt")
    return d, terminal.edited_zips(d)


TERMINAL_RUNS = [("inspect", [f"in{terminal.PAYLOAD}.pt"]), ("inspect --json", ["--json", f"in{terminal.PAYLOAD}.pt"]),
                 ("archive root", ["archive_root.pt"]), ("collision", ["collide.pt"]),
                 ("prefix", [f"in{terminal.PAYLOAD}.pt", "--prefix", "nope"])] + [
                    (f, [f]) for f in ("byteorder.pt", "global_name.pt", "storage_key.pt", "zip_entry_name.pt")]


@pytest.mark.parametrize("args", [a for _, a in TERMINAL_RUNS], ids=[i for i, _ in TERMINAL_RUNS])
def test_terminal_safe_output_same_as_native(terminal_inputs, args):
    """Hostile names (tests/e2e/test_terminal.py) under WASI: the same escaped bytes as natively on stdout and
    stderr (reports and error lines), no raw control or format character."""
    d, _ = terminal_inputs
    argv = ["inspect"] + [f"/in/{a}" if a.endswith(".pt") else a for a in args]
    w = subprocess.run(wasm_argv(argv, dirs=[(d, "/in")], limits={"max-memory-size": HOSTILE_CAP}), capture_output=True,
                       timeout=120)
    n = subprocess.run([str(NATIVE), "inspect"] + [str(d / a) if a.endswith(".pt") else a for a in args],
                       capture_output=True, timeout=120)
    assert w.returncode == n.returncode, (w.returncode, n.returncode, w.stderr[-2000:])
    for out, what in ((w.stdout, "stdout"), (w.stderr, "stderr")):
        terminal.assert_terminal_safe(out, f"WASI {what}")
    host = str(d).encode()
    assert (w.stdout, w.stderr) == (n.stdout.replace(host, b"/in"), n.stderr.replace(host, b"/in"))


def last_error(stderr, roots):
    """The `ckptconv: error[kind]:` line, with host folders spelled as their guest mounts."""
    lines = [l for l in stderr.splitlines() if l.startswith("ckptconv: error[")]
    assert len(lines) == 1, f"expected one error line:\n{stderr}"
    line = lines[0]
    for m, h in roots.items():
        line = line.replace(str(h), f"/{m}")
    return line


SAME_REFUSAL = [
    ("verl/single-rank-file", VERL / "fsdp2_ws2", ["convert", In("actor/model_world_size_2_rank_1.pt"), Out("hf")]),
    ("trust/without-allow-global", FIXTURES / "trust", ["convert", In("simple_namespace_config.pt"), Out("hf")]),
    ("trust/another-allow-global", FIXTURES / "trust", ["convert", In("simple_namespace_config.pt"), Out("hf"),
                                                        "--allow-global", "types.ModuleType"]),
    ("megatron/mg2hf-not-megatron", PT, ["mg2hf", In("parameters.pt"), Out("hf"), In("")]),
    # one shard of a set without its siblings, and an index naming a shard that is not there (issue 18)
    ("hf_sets/lone-shard", FIXTURES / "hf_sets" / "bad", ["convert", In("lone/model-00002-of-00003.safetensors"), Out("hf")]),
    ("hf_sets/index-names-absent", FIXTURES / "hf_sets" / "bad", ["convert", In("absent"), Out("hf")]),
    # a Qwen3-MoE checkpoint (EP 2) against a Qwen2-MoE base: refused, naming the rank file, by the family checks
    ("megatron_moe/wrong-moe-base", MOE, ["mg2hf", In("qwen3moe_ep2/actor"), Out("hf"), In("qwen2moe_ep2/base_hf")]),
] + ([(f"lora/rank_mismatch-{mode}", LORA, ["convert", In("bad/rank_mismatch.pt"), Out("hf"), "--base", In("base_qwen2"),
                                             "--lora", mode, "--lora-path", In("lora_path")]) for mode in ("merge", "adapter")]
     if (LORA / "bad" / "rank_mismatch.pt").exists() else [])


@pytest.mark.parametrize("in_root,args", [c[1:] for c in SAME_REFUSAL], ids=[c[0] for c in SAME_REFUSAL])
def test_same_refusal(tmp_path, in_root, args):
    """Inputs ckptconv refuses for what they hold (not for I/O): exit 1 both ways, the same error line, no output."""
    nat_out, wasm_out = tmp_path / "native", tmp_path / "wasi"
    nat_out.mkdir()
    wasm_out.mkdir()
    n = run_native(resolve(args, {"in": in_root, "out": nat_out}, "host"))
    w = run_wasm(resolve(args, None, "guest"), dirs=[(in_root, "/in"), (wasm_out, "/out")], limits={"max-memory-size": HOSTILE_CAP})
    assert n.returncode == 1, f"native exit {n.returncode}:\n{n.stderr}"
    assert_error(w)
    assert last_error(n.stderr, {"in": in_root, "out": nat_out}) == last_error(w.stderr, {})
    assert not [p for p in wasm_out.rglob("*") if p.is_file()], "output left behind"



def test_verify_finds_the_same_damage(tmp_path):
    """`verify --against` reads a damaged output (one flipped bit) and names it the same way under WASI."""
    out = tmp_path / "out"
    r = run_native(["convert", PT / "qwen2_tiny_full_weights.pt", out / "hf", "--max-shard-size", "20KB"])
    assert r.returncode == 0, r.stderr
    shard = sorted((out / "hf").glob("*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's data
    shard.write_bytes(data)
    args = ["verify", Out("hf"), "--against", In("qwen2_tiny_full_weights.pt")]
    n = run_native(resolve(args, {"in": PT, "out": out}, "host"))
    w = run_wasm(resolve(args, None, "guest"), dirs=[(PT, "/in"), (out, "/out")])
    assert n.returncode == 1 and w.returncode == 1, (n.stderr, w.stderr)
    line = last_error(n.stderr, {"in": PT, "out": out})
    assert line.startswith(f"ckptconv: error[verify]: /out/hf/{shard.name}: verification failed: tensor '"), line
    assert line == last_error(w.stderr, {})
    ok = run_wasm(resolve(["verify", Out("hf")], None, "guest"), dirs=[(out, "/out")])
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr

# --- 3. exit codes -------------------------------------------------------------------------------------------

def test_exit_0_ok(tmp_path):
    r = run_wasm(["convert", "/in/parameters.pt", "/out/hf"], dirs=[(PT, "/in"), (tmp_path, "/out")])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    for args in (["--help"], ["--version"], ["convert", "--help"]):
        r = run_wasm(args)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.strip(), args


@pytest.mark.parametrize("args,needle", [
    (["convert", "/in/does_not_exist.pt", "/out/hf"], "does_not_exist.pt"),
    (["inspect", "/in/does_not_exist.pt"], "does_not_exist.pt"),
    (["convert", "/in/random_bytes.pt", "/out/hf"], "random_bytes.pt"),
    (["dcp-to-pt", "--dcp_path", "/in/does_not_exist", "--output_path", "/out/model.pt"], "does_not_exist"),
])
def test_exit_1_error(tmp_path, args, needle):
    mount = tmp_path / "in"
    mount.mkdir()
    shutil.copy(HOSTILE / "random_bytes.pt", mount)
    out = tmp_path / "out"
    out.mkdir()
    assert_error(run_wasm(args, dirs=[(mount, "/in"), (out, "/out")]), needle)
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("*.pt"))


def test_exit_1_existing_output_without_force(tmp_path):
    """As natively: an existing output file is an error (1, untouched) unless --force, which overwrites it."""
    args = ["convert", "/in/parameters.pt", "/out/hf"]
    dirs = [(PT, "/in"), (tmp_path, "/out")]
    assert run_wasm(args, dirs=dirs).returncode == 0
    good = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"old")
    r = run_wasm(args, dirs=dirs)
    assert_error(r, "--force")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"], "temp files left behind"
    r = run_wasm(args + ["--force"], dirs=dirs)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == good


@pytest.mark.parametrize("args", [
    ["convert", "/in/parameters.pt", "/out/hf", "--no-such-flag"],
    ["convert", "/in/parameters.pt", "/out/hf", "--dtype", "int3"],
    ["convert", "/in/parameters.pt", "/out/hf", "--format", "npz"],
    ["convert"],
    ["no-such-command"],
    ["dcp-to-pt", "--dcp_path", "/in"],
    [],
])
def test_exit_2_usage(tmp_path, args):
    r = run_wasm(args, dirs=[(PT, "/in"), (tmp_path, "/out")])
    assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.stderr}"
    assert "panicked" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_native_and_wasi_exit_codes_agree(tmp_path):
    """The same table natively: so the WASI codes above are the CLI's, not the runner's."""
    for args, want in [(["convert", "{IN}/does_not_exist.pt", "{OUT}/a"], 1), (["convert"], 2), (["--version"], 0)]:
        n = run_native([a.replace("{IN}", str(PT)).replace("{OUT}", str(tmp_path)) for a in args])
        w = run_wasm([a.replace("{IN}", "/in").replace("{OUT}", "/out") for a in args], dirs=[(PT, "/in"), (tmp_path, "/out")])
        assert (n.returncode, w.returncode) == (want, want), (args, n.stderr, w.stderr)


# --- 4. memory -----------------------------------------------------------------------------------------------

def peak_of(report):
    return int(report.read_text()) if report.exists() else None


MEMORY_CASES = [c for c in CASES if c["id"] in (
    "pt/qwen2_tiny_full_weights.pt", "sample/full_weights.pt", "dcp/fsdp2_ws2/global_step_1/actor/dcp_checkpoint",
    "megatron/qwen2_tp2_pp2", "verl/layouts_ws4", "lora/merge-lora-path")]


@pytest.mark.parametrize("c", [pytest.param(c, id=c["id"]) for c in MEMORY_CASES])
def test_fixture_within_64mib(tmp_path, c):
    report = tmp_path / "peak"
    nat, wasm, _ = both(tmp_path, c["in_root"], c["args"], limits={"max-memory-size": MEMORY_TARGET}, memory_report=report)
    assert_same_tree(nat, wasm, " ".join(c["args"]))
    peak = peak_of(report)
    if peak is not None:
        print(f"peak linear memory {peak / MiB:.1f} MiB")
        assert peak <= MEMORY_TARGET


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    """Inputs larger than the 64 MiB cap, made by torch in a child process: a .pt (~200 MB: one 100 MB tensor,
    several 16 MB ones, bf16, int64, and a non-contiguous view) and a one-rank DCP folder of the same dict."""
    root = tmp_path_factory.mktemp("wasi_big")
    code = r"""
import sys, torch, warnings
from pathlib import Path
root = Path(sys.argv[1])
g = torch.Generator().manual_seed(11)
sd = {
    "big.weight": torch.randn(25_000_000, generator=g),                 # 100 MB, one tensor > the cap
    **{f"layers.{i}.w": torch.randn(2048, 2048, generator=g) for i in range(4)},   # 16 MiB each
    "bf16.weight": torch.randn(4096, 3000, generator=g).to(torch.bfloat16),
    "ids": torch.arange(3_000_000, dtype=torch.int64),
}
torch.save(sd, root / "big.pt")
import torch.distributed.checkpoint as dcp
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dcp.save({"model": sd}, checkpoint_id=str(root / "big_dcp"), no_dist=True)
base = torch.randn(2048, 2048, generator=g)
torch.save({"t.weight": base.t(), "slice.weight": base[::2, 1:]}, root / "views.pt")
"""
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No module named 'torch'" in r.stderr:
        pytest.skip("torch is needed to generate the >64 MiB inputs")
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("args", [
    ["convert", In("big.pt"), Out("hf")],
    ["convert", In("big.pt"), Out("hf"), "--dtype", "bf16"],
    ["convert", In("big.pt"), Out("hf"), "--max-shard-size", "50MB"],
    ["convert", In("big.pt"), Out("hf"), "--format", "pt"],
    ["convert", In("big_dcp"), Out("hf")],
    ["dcp-to-pt", "--dcp_path", In("big_dcp"), "--output_path", Out("model.pt")],
], ids=["pt", "pt-bf16", "pt-shards", "pt-format-pt", "dcp", "dcp-to-pt"])
def test_input_larger_than_cap_within_64mib(tmp_path, big_inputs, args):
    """Streaming, not loading: ~200 MB in, under -W max-memory-size=64 MiB, same bytes as native."""
    report = tmp_path / "peak"
    src = big_inputs / args[1 if args[0] == "convert" else 2]
    size = src.stat().st_size if src.is_file() else sum(p.stat().st_size for p in src.iterdir())
    assert size > 2 * MEMORY_TARGET
    nat, wasm, _ = both(tmp_path, big_inputs, args, limits={"max-memory-size": MEMORY_TARGET}, memory_report=report)
    assert_same_tree(nat, wasm, " ".join(args))
    peak = peak_of(report)
    if peak is not None:
        print(f"{size / MiB:.0f} MiB input: peak linear memory {peak / MiB:.1f} MiB")
        assert peak <= MEMORY_TARGET


@pytest.mark.parametrize("name", ["big.pt", "views.pt"])
def test_deflated_input_larger_than_cap_within_64mib(tmp_path, big_inputs, name):
    """The >64 MiB inputs re-zipped deflated (tests/deflated.py): storages larger than the cap are inflated as bands
    read them, the transposed view of views.pt starts its entry over once per band; the same bytes as natively
    and as the stored original, under the 64 MiB cap."""
    d = tmp_path / "in"
    d.mkdir()
    (d / name).write_bytes(deflated.rezip((big_inputs / name).read_bytes(), level=1))
    report = tmp_path / "peak"
    nat, wasm, _ = both(tmp_path, d, ["convert", In(name), Out("hf")], limits={"max-memory-size": MEMORY_TARGET},
                        memory_report=report)
    assert_same_tree(nat, wasm, f"deflated {name}")
    original = tmp_path / "original"
    r = run_native(["convert", big_inputs / name, original])
    assert r.returncode == 0, r.stderr
    assert tree(original) == tree(nat / "hf"), f"deflated {name} converts to other bytes than the original"
    peak = peak_of(report)
    if peak is not None:
        print(f"deflated {name}: peak linear memory {peak / MiB:.1f} MiB")
        assert peak <= MEMORY_TARGET


def test_views_larger_than_buffers(tmp_path, big_inputs):
    """A 16 MiB transposed view and a strided slice (gathered, not copied in one run) under the 64 MiB cap."""
    report = tmp_path / "peak"
    nat, wasm, _ = both(tmp_path, big_inputs, ["convert", In("views.pt"), Out("hf")], limits={"max-memory-size": MEMORY_TARGET},
                        memory_report=report)
    assert_same_tree(nat, wasm, "views.pt")
    peak = peak_of(report)
    if peak is not None:
        print(f"views: peak linear memory {peak / MiB:.1f} MiB")


def test_parts_under_wasi_equal_one_native_run(tmp_path):
    """Scale-out parts run by the WASI module (as the Ray driver's --wasm does), in a shuffled order, then the
    finishing step, give the native single run's files; --jobs above 1 is refused (no threads in WASI)."""
    flags = ["--max-shard-size", "40KB"]
    ref = tmp_path / "ref"
    r = run_native(["convert", PT / "qwen2_tiny_full_weights.pt", ref, *flags])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    out.mkdir()
    dirs = [(str(PT), "/in"), (str(out), "/out")]
    argv = ["convert", "/in/qwen2_tiny_full_weights.pt", "/out", *flags]
    def ok(r):
        assert r.returncode == 0, r.stderr

    for i in (3, 1):
        ok(run_wasm(argv + ["--part", f"{i}/3"], dirs))
    r = run_wasm(argv + ["--finish"], dirs)
    assert r.returncode == 1 and "the finishing step needs every data file" in r.stderr, r.stderr
    assert not (out / INDEX).exists()
    ok(run_wasm(argv + ["--part", "2/3"], dirs))
    ok(run_wasm(argv + ["--finish"], dirs))
    assert_same_tree(ref, out, "parts under WASI")
    r = run_wasm(argv + ["--jobs", "2", "--force"], dirs)
    assert r.returncode == 1 and "--jobs above 1 needs threads" in r.stderr, r.stderr
