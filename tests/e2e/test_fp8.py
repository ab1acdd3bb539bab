"""FP8 releases dequantize to exactly what DeepSeek-V3's weight_dequant gives (issue 18).

Owns: tests/e2e/test_fp8.py. Inputs are made once per session by tests/fixtures/make_fp8_fixtures.py (a tiny random
transformers 5 DeepseekV3ForCausalLM quantized by transformers' own Fp8Quantize op; nothing committed): DeepSeek-V3
style block FP8 (`weight` float8_e4m3fn + `weight_scale_inv` fp32 on a ceil grid with ragged edge blocks, block from
config.json's quantization_config.weight_block_size) as sharded safetensors with [128, 128] and [64, 64] blocks and as
one torch.save file, and compressed-tensors style per-tensor FP8 (`weight_scale` [1]).

The reference is DeepSeek-V3 inference/kernel.py weight_dequant's arithmetic (Triton, GPU only) done in torch by the
fixture module: fp32(q) * the fp32 scale of its block, rounded once to the output dtype; it is checked here against
transformers 5's own CPU dequant (`_dequantize_fp8_weight` in fp32, then cast). transformers' from_pretrained CPU path
(Fp8Dequantize) is not a reference: it takes the block as rows / grid rows, raising on ragged [128, 128] grids and
silently using wrong blocks on ragged [64, 64] ones (the fixture's findings.json records it).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, INDEX, assert_same, load_output

sys.path.insert(0, str(FIXTURES))
import make_fp8_fixtures as fx  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# source name -> (input path relative to the fixture root, --base folder or None, fixture case)
SOURCES = {
    "block128_st": ("block128_st", None, "block128"),
    "block128_pt": ("block128.pt", "block128_st", "block128"),
    "block128_pt_nobase": ("block128.pt", None, "block128"),  # the default block, 128 x 128
    "block64_st": ("block64_st", None, "block64"),
    "per_tensor_st": ("per_tensor_st", None, "per_tensor"),
}
WITH_CONFIG = [s for s, (src, base, _) in SOURCES.items() if base or not src.endswith(".pt")]


@pytest.fixture(scope="session")
def fp8_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_fp8_fixtures.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"make_fp8_fixtures.py failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return out


def convert(run, root, source, out, *flags):
    src, base, _ = SOURCES[source]
    args = [root / src, out, "--quiet", *flags]
    if base:
        args += ["--base", root / base]
    return run("convert", *args)


def convert_ok(run, root, source, out, *flags):
    r = convert(run, root, source, out, *flags)
    assert r.returncode == 0, f"convert {source} {flags}: exit {r.returncode}\n{r.stderr}"
    return r


def read_input(path):
    """The FP8 state dict as the release holds it (every shard of a folder, or the torch.save file)."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if (path / INDEX).exists():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(path / f))
    return sd


def base_config(root, source):
    src, base, _ = SOURCES[source]
    folder = root / (base or src)
    return json.loads((folder / "config.json").read_text())


def check_cast_config(root, source, out, dtype):
    """quantization_config gone; torch_dtype / dtype (whichever the base has) name the new dtype; the rest as is."""
    got = json.loads((out / "config.json").read_text())
    base = base_config(root, source)
    assert "quantization_config" in base
    assert "quantization_config" not in got, got["quantization_config"]
    keys = [k for k in ("torch_dtype", "dtype") if k in got]
    assert keys, f"out/config.json names no dtype: {sorted(got)}"
    for k in keys:
        assert got[k] == CONFIG_DTYPE[dtype], f"config {k} = {got[k]!r} after --dtype {dtype}"
    rest = lambda c: {k: v for k, v in c.items() if k not in ("torch_dtype", "dtype", "quantization_config")}
    assert rest(got) == rest(base)


def assert_nothing_finished(out):
    out = Path(out)
    if not out.exists():
        return
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    bad = [p for p in left if p.endswith((".safetensors", ".json", ".bin")) or "ckptconv-partial" in p]
    assert not bad, f"a failed conversion left {bad} in {out}"


@torch.no_grad()
def hf_logits(folder, ids, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{folder}: transformers did not load cleanly: {bad}"
    return model.eval()(input_ids=ids).logits.float()


# --- the reference itself -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(fx.CASES))
def test_reference_agrees_with_transformers_cpu_dequant(fp8_root, case):
    """Our torch weight_dequant == transformers' _dequantize_fp8_weight in fp32 then cast (it clips edge blocks),
    for every quantized weight, in bf16 and fp16; and the stored expected_bf16 is that reference."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    block = fx.BLOCKS[case]
    sd = read_input(fp8_root / fx.CASES[case])
    n = 0
    for k, q in sd.items():
        if q.dtype != fx.FP8:
            continue
        s = sd[fx.scale_name(k, block)]
        tf = _dequantize_fp8_weight(q, s.reshape(()) if block is None else s, block, torch.float32)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(fx.reference_dequant(q, s, block, dt).view(torch.int16), tf.to(dt).view(torch.int16)), k
        n += 1
    assert n == 28, n  # layer 0: 5 attention + 3 MLP; layer 1: 5 attention + (4 routed + 1 shared) x 3
    stored = load_file(fp8_root / "ref" / case / "expected_bf16.safetensors")
    assert_same(stored, fx.dequantize_state_dict(sd, block, torch.bfloat16), f"{case} expected_bf16")


def test_fixture_shape(fp8_root):
    """The release looks like DeepSeek-V3's: ragged grids, a scale in another shard than its weight, bf16/fp32 rest."""
    sd = read_input(fp8_root / "block128_st")
    assert sd["model.layers.0.self_attn.q_a_proj.weight"].dtype == fx.FP8
    assert sd["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 3)  # [200, 320]
    assert sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 3)  # [144, 320]
    assert sd["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["lm_head.weight"].dtype == sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    wm = json.loads((fp8_root / "block128_st" / INDEX).read_text())["weight_map"]
    assert wm[fx.SPLIT_PAIR] != wm[fx.SPLIT_PAIR + "_scale_inv"]
    assert len(set(wm.values())) > 1
    pt = read_input(fp8_root / "per_tensor_st")
    assert pt["model.layers.0.self_attn.q_a_proj.weight_scale"].shape == (1,)


# --- dequantization -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", list(SOURCES))
def test_bf16_is_the_reference(run, tmp_path, fp8_root, source):
    _, _, case = SOURCES[source]
    out = tmp_path / "out"
    convert_ok(run, fp8_root, source, out, "--dtype", "bf16")
    got = load_output(out)
    assert not [k for k in got if k.endswith(("_scale_inv", ".weight_scale"))], sorted(got)
    assert_same(got, load_file(fp8_root / "ref" / case / "expected_bf16.safetensors"), source)
    if source in WITH_CONFIG:
        check_cast_config(fp8_root, source, out, "bf16")


@pytest.mark.parametrize("source", ["block128_st", "block128_pt"])
def test_inspect_lists_what_convert_writes(run, tmp_path, fp8_root, source):
    """inspect --dtype bf16 plans what convert writes: the weights dequantized to BF16, no scales."""
    src, base, _ = SOURCES[source]
    r = run("inspect", fp8_root / src, "--dtype", "bf16", "--json", *(["--base", fp8_root / base] if base else []))
    assert r.returncode == 0, r.stderr
    listed = {t["name"]: (t["dtype"], t["shape"]) for t in json.loads(r.stdout)["tensors"]}
    out = tmp_path / "out"
    convert_ok(run, fp8_root, source, out, "--dtype", "bf16")
    written = {k: ({torch.bfloat16: "BF16", torch.float32: "F32"}[v.dtype], list(v.shape))
               for k, v in load_output(out).items()}
    assert listed == written


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("source", ["block128_st", "block128_pt", "block64_st", "per_tensor_st"])
def test_other_dtypes_are_the_reference(run, tmp_path, fp8_root, source, dtype):
    """fp32: the exact fp32 product; fp16: that product rounded once to fp16 (not via bf16)."""
    src, _, case = SOURCES[source]
    out = tmp_path / "out"
    convert_ok(run, fp8_root, source, out, "--dtype", dtype)
    want = fx.dequantize_state_dict(read_input(fp8_root / src), fx.BLOCKS[case], DTYPES[dtype])
    assert_same(load_output(out), want, f"{source} {dtype}")
    check_cast_config(fp8_root, source, out, dtype)


@pytest.mark.parametrize("source", ["block128_st", "block128_pt", "block64_st", "per_tensor_st"])
def test_bf16_logits(run, tmp_path, fp8_root, source):
    """transformers loads our bf16 output cleanly and gives the logits of the model built from the reference weights."""
    _, _, case = SOURCES[source]
    out = tmp_path / "out"
    convert_ok(run, fp8_root, source, out, "--dtype", "bf16")
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(fp8_root / "ref" / case / "config.json", ref / "config.json")
    shutil.copy(fp8_root / "ref" / case / "expected_bf16.safetensors", ref / "model.safetensors")
    ids = torch.load(fp8_root / "input_ids.pt", weights_only=True)
    got, want = hf_logits(out, ids), hf_logits(ref, ids)
    assert torch.equal(got, want), f"{source}: max |logits diff| = {(got - want).abs().max().item()}"


@pytest.mark.parametrize("source", ["block128_st", "block128_pt", "block64_st", "per_tensor_st"])
def test_without_dtype_copies_fp8_as_is(run, tmp_path, fp8_root, source):
    src, _, _ = SOURCES[source]
    out = tmp_path / "out"
    convert_ok(run, fp8_root, source, out)
    got = load_output(out)
    assert_same(got, read_input(fp8_root / src), source)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == base_config(fp8_root, source), "config.json changed without a cast"


# --- bad inputs -----------------------------------------------------------------------------------------------------

def rewrite_shard(folder, name, edit):
    """Apply edit(tensors) to the shard that holds `name`; keep the index's weight_map and total_size true."""
    index_path = folder / INDEX
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][name]
    tensors = edit(load_file(shard))
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in read_input(folder).values())
    index_path.write_text(json.dumps(index, indent=2))
    return shard.name


def drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def replace(key, fn):
    return lambda t: {k: (fn(v) if k == key else v) for k, v in t.items()}


VICTIM = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # [144, 320], scale [2, 3]


def bad_missing_scale(root, tmp):
    folder = tmp / "in"
    shutil.copytree(root / "block128_st", folder)
    return folder, None, rewrite_shard(folder, VICTIM + "_scale_inv", drop(VICTIM + "_scale_inv"))


def bad_missing_scale_pt(root, tmp):
    sd = read_input(root / "block128.pt")
    del sd[VICTIM + "_scale_inv"]
    torch.save(sd, tmp / "cut.pt")
    return tmp / "cut.pt", root / "block128_st", "cut.pt"


def bad_scale_row_short(root, tmp):
    folder = tmp / "in"
    shutil.copytree(root / "block128_st", folder)
    return folder, None, rewrite_shard(folder, VICTIM + "_scale_inv",
                                       replace(VICTIM + "_scale_inv", lambda s: s[:-1].clone()))


def bad_scale_row_extra(root, tmp):
    folder = tmp / "in"
    shutil.copytree(root / "block128_st", folder)
    return folder, None, rewrite_shard(folder, VICTIM + "_scale_inv",
                                       replace(VICTIM + "_scale_inv", lambda s: torch.cat([s, s[-1:]]).clone()))


def bad_config_says_block64(root, tmp):
    """128-block scales under a config that declares [64, 64]: no grid fits; ckptconv must not guess."""
    folder = tmp / "in"
    shutil.copytree(root / "block128_st", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder, None, None


def bad_block64_pt_without_base(root, tmp):
    """64-block scales in a bare .pt: the default 128 x 128 grid does not fit them."""
    torch.save(read_input(root / "block64_st"), tmp / "b64.pt")
    return tmp / "b64.pt", None, "b64.pt"


BAD = {
    "missing_scale": bad_missing_scale,
    "missing_scale_pt": bad_missing_scale_pt,
    "scale_row_short": bad_scale_row_short,
    "scale_row_extra": bad_scale_row_extra,
    "config_says_block64": bad_config_says_block64,
    "block64_pt_without_base": bad_block64_pt_without_base,
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_fp8_input_fails_cleanly(run, tmp_path, fp8_root, bad):
    src, base, named = BAD[bad](fp8_root, tmp_path)
    out = tmp_path / "out"
    args = [src, out, "--dtype", "bf16"] + (["--base", base] if base else [])
    r = run("convert", *args)
    assert r.returncode == 1, f"{bad}: exit {r.returncode}\n{r.stderr}"
    assert "error[" in r.stderr, r.stderr
    if named:
        assert named in r.stderr, f"{bad}: stderr does not name {named}:\n{r.stderr}"
    else:  # the shard holding the misfit weight, or the config that declares the block
        shard = json.loads((src / INDEX).read_text())["weight_map"]
        assert any(f in r.stderr for f in set(shard.values()) | {"config.json"}), r.stderr
    assert "scale" in r.stderr.lower() or "block" in r.stderr.lower(), r.stderr
    assert_nothing_finished(out)
