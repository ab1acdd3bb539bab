"""Hugging Face weight sets that transformers 4 writes, for 16 architectures: ckptconv's output equals transformers'
own save_pretrained(safe_serialization=True) (issue 18, must-show 1-3, HF part).

Owns: tests/e2e/test_hf_sets.py. Inputs: tests/fixtures/make_hf_arch_fixtures.py, run once per session with
transformers 4.57 (PYTHONPATH=.venv/transformers4, CKPTCONV_TRANSFORMERS4 overrides): per architecture a .bin set
(bin/), the safetensors set of the same model (st/) and of the model cast to bf16 (st_bf16/), sharded or not
(make_hf_arch_fixtures.ARCHS), the forward's inputs and transformers 4's logits. Expectations come from the
libraries:
  - names, dtypes, shapes and bytes of the output are st/'s (or st_bf16/'s after --dtype bf16): the tied aliases
    that save_pretrained(safe) drops (lm_head.weight, proj_out.weight, cls.predictions.decoder.*,
    encoder/decoder.embed_tokens.weight) are dropped, whichever way the set is named on the command line (folder,
    index file, single file, one shard with its siblings beside it);
  - the config's dtype fields (`dtype`, `torch_dtype`, at any depth) are st/'s (st_bf16/'s after the cast), the rest
    of config.json and generation_config.json are the input folder's;
  - transformers 5 loads the output with no missing or unexpected key and computes the same logits as from st/
    and as transformers 4 did;
  - broken sets exit 1, name the file, and leave nothing finished-looking in OUT.
Run: .venv/bin/python -m pytest tests/e2e/test_hf_sets.py   (binary: env CKPTCONV, see conftest.py)
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, assert_same, load_output

sys.path.insert(0, str(FIXTURES))
from make_hf_arch_fixtures import ARCHS, QVL_TOKENS  # noqa: E402

TF4 = Path(os.environ.get("CKPTCONV_TRANSFORMERS4", REPO / ".venv" / "transformers4"))
DTYPE_KEYS = ("dtype", "torch_dtype")
SHARDED = [(a, kind) for a, spec in ARCHS.items() for kind, on in (("bin", spec[3]), ("st", spec[4])) if on]
SHARDED_IDS = [f"{a}-{kind}" for a, kind in SHARDED]


@pytest.fixture(scope="session")
def sets(tmp_path_factory):
    if not (TF4 / "transformers").is_dir():
        pytest.fail(f"transformers 4 not found at {TF4}: run scripts/setup.sh (or set CKPTCONV_TRANSFORMERS4)")
    out = tmp_path_factory.mktemp("hf_sets")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TF4), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(FIXTURES / "make_hf_arch_fixtures.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"make_hf_arch_fixtures.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return out


def meta(case):
    return json.loads((case / "meta.json").read_text())


def set_tensors(folder):
    """The tensors of a safetensors set as the safetensors library reads them."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def dtype_fields(cfg, path=""):
    """{dotted path: value} of every dtype / torch_dtype key of a config, sub-configs included."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(dtype_fields(v, f"{path}{k}."))
        elif k in DTYPE_KEYS:
            out[path + k] = v
    return out


def without_dtype(cfg):
    return {k: without_dtype(v) if isinstance(v, dict) else v for k, v in cfg.items() if k not in DTYPE_KEYS}


def read_json(path):
    return json.loads(path.read_text())


def convert_ok(run, src, out, *flags):
    r = run("convert", src, out, "--quiet", *flags)
    assert r.returncode == 0, f"convert {src}: exit {r.returncode}\n{r.stderr}"
    return r


def convert_fails(run, src, out, *flags):
    """Exit 1 with an error line, and nothing in OUT that looks like a finished conversion."""
    r = run("convert", src, out, "--quiet", *flags)
    assert r.returncode == 1, f"convert {src}: exit {r.returncode} (want 1)\n{r.stderr}"
    assert "error[" in r.stderr, r.stderr
    if out.exists():
        left = sorted(p.name for p in out.rglob("*"))
        finished = [n for n in left if n.endswith((".safetensors", ".bin", ".index.json", ".json"))
                    or "ckptconv-partial" in n]
        assert not finished, f"convert {src} failed but left {finished} in OUT"
    return r


def sources(arch):
    """Ways to name each set on the command line: folder, index or single file, one shard (siblings beside)."""
    bin_sharded, st_sharded = ARCHS[arch][3], ARCHS[arch][4]
    out = ["bin", "st",
           "bin/pytorch_model.bin.index.json" if bin_sharded else "bin/pytorch_model.bin",
           "st/model.safetensors.index.json" if st_sharded else "st/model.safetensors"]
    if bin_sharded:
        out.append("bin/shard2")
    if st_sharded:
        out.append("st/shard2")
    return out


def resolve(case, source):
    kind, _, what = source.partition("/")
    if what == "shard2":
        return case / kind / meta(case)[f"{kind}_files"][1]
    return case / source


# --- the output is save_pretrained(safe) ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,source", [(a, s) for a in ARCHS for s in sources(a)],
                         ids=[f"{a}-{s}" for a in ARCHS for s in sources(a)])
def test_set_converts_to_save_pretrained_safe(run, tmp_path, sets, arch, source):
    case = sets / arch
    src = resolve(case, source)
    out = tmp_path / "out"
    convert_ok(run, src, out)
    assert_same(load_output(out), set_tensors(case / "st"), f"{arch} from {source}")
    if src.is_dir() or source.endswith(("index.json", "shard2")):
        # a set's folder is its own base: config and generation config copied, dtype fields as save_pretrained's
        folder = src if src.is_dir() else src.parent
        got, want = read_json(out / "config.json"), read_json(case / "st" / "config.json")
        assert dtype_fields(got) == dtype_fields(want), f"{arch}: dtype fields {dtype_fields(got)}"
        assert got == read_json(folder / "config.json"), f"{arch}: config.json differs from the input's"
        gen = folder / "generation_config.json"
        assert (out / "generation_config.json").is_file() == gen.is_file(), sorted(os.listdir(out))
        if gen.is_file():
            assert read_json(out / "generation_config.json") == read_json(gen)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_cast_is_save_pretrained_of_the_bf16_model(run, tmp_path, sets, arch):
    """--dtype bf16 from the .bin set: model.to(bfloat16).save_pretrained(safe)'s tensors, bit for bit, and its
    config dtype fields; nothing else of config.json changes."""
    case = sets / arch
    out = tmp_path / "out"
    convert_ok(run, case / "bin", out, "--dtype", "bf16")
    assert_same(load_output(out), set_tensors(case / "st_bf16"), f"{arch} bf16")
    got, want = read_json(out / "config.json"), read_json(case / "st_bf16" / "config.json")
    assert dtype_fields(got) == dtype_fields(want), f"{arch}: {dtype_fields(got)} != {dtype_fields(want)}"
    assert without_dtype(got) == without_dtype(read_json(case / "bin" / "config.json"))


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_bf16_cast_rewrites_nested_dtype_fields(run, tmp_path, sets, arch):
    """A composite config as transformers 5 writes it (dtype in text_config and vision_config too; transformers 4.57
    writes the top-level one only): after --dtype bf16 every dtype field says bfloat16 (the contract; transformers
    5's own save_pretrained of a cast model updates the top level only)."""
    import transformers

    case = sets / arch
    src = tmp_path / "src"
    shutil.copytree(case / "st", src)
    model = getattr(transformers, meta(case)["class"]).from_pretrained(src, dtype=torch.float32)
    model.config.save_pretrained(src)
    fields = dtype_fields(read_json(src / "config.json"))
    assert len(fields) > 1 and set(fields.values()) == {"float32"}, fields
    out = tmp_path / "out"
    convert_ok(run, src, out, "--dtype", "bf16")
    assert_same(load_output(out), set_tensors(case / "st_bf16"), f"{arch} bf16")
    got = dtype_fields(read_json(out / "config.json"))
    assert got == dict.fromkeys(fields, "bfloat16"), got


# --- transformers 5 loads it -----------------------------------------------------------------------------------

def tf5_inputs(arch, x):
    if arch == "qwen2_vl":  # transformers 5 wants the processor's modality ids beside the image (1 = image token)
        x = dict(x, mm_token_type_ids=(x["input_ids"] == QVL_TOKENS["image_token_id"]).int())
    return x


@torch.no_grad()
def tf5_logits(folder, cls_name, x):
    import transformers

    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{folder}: transformers did not load cleanly: {bad}"
    return model.eval()(**x).logits.float()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers5_logits(run, tmp_path, sets, arch):
    case = sets / arch
    out = tmp_path / "out"
    convert_ok(run, case / "bin", out)
    cls = meta(case)["class"]
    x = tf5_inputs(arch, torch.load(case / "inputs.pt", weights_only=True))
    got = tf5_logits(out, cls, x)
    want = tf5_logits(case / "st", cls, x)
    assert (got - want).abs().max().item() <= 1e-6, f"{arch}: transformers 5 on ckptconv's output vs on st/"
    ref = torch.load(case / "reference.pt", weights_only=True)["logits"]
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-6, f"{arch}: max |transformers 5 (ckptconv output) - transformers 4| = {diff}"


# --- broken and partial sets -------------------------------------------------------------------------------------

def lone_shard(case, kind, dest):
    """Shard 2 of the set copied alone into dest; returns (its path, the names of the shards left behind)."""
    files = meta(case)[f"{kind}_files"]
    dest.mkdir()
    shutil.copy(case / kind / files[1], dest / files[1])
    return dest / files[1], [f for f in files if f != files[1]]


@pytest.mark.parametrize("arch,kind", SHARDED, ids=SHARDED_IDS)
def test_lone_shard_names_its_missing_siblings(run, tmp_path, sets, arch, kind):
    shard, missing = lone_shard(sets / arch, kind, tmp_path / "in")
    r = convert_fails(run, shard, tmp_path / "out")
    assert shard.name in r.stderr, r.stderr
    for name in missing:
        assert name in r.stderr, f"stderr does not name the missing {name}:\n{r.stderr}"


@pytest.mark.parametrize("arch,kind", SHARDED, ids=SHARDED_IDS)
def test_lone_shard_allow_partial_converts_that_shard(run, tmp_path, sets, arch, kind):
    """--allow-partial: the shard's own tensors, less the tied aliases save_pretrained(safe) drops (they sit in the
    same shard as the name kept, sharing its storage)."""
    case = sets / arch
    shard, _ = lone_shard(case, kind, tmp_path / "in")
    out = tmp_path / "out"
    convert_ok(run, shard, out, "--allow-partial")
    if kind == "st":
        want = load_file(shard)
    else:
        want = torch.load(shard, map_location="cpu", weights_only=True)
        want = {k: v for k, v in want.items() if k not in meta(case)["dropped"]}
    assert want, f"{shard.name} holds no tensor"
    assert_same(load_output(out), want, f"{arch} {shard.name}")


@pytest.mark.parametrize("arch,kind", SHARDED, ids=SHARDED_IDS)
def test_index_names_an_absent_shard(run, tmp_path, sets, arch, kind):
    src = tmp_path / "in"
    shutil.copytree(sets / arch / kind, src)
    gone = meta(sets / arch)[f"{kind}_files"][-1]
    (src / gone).unlink()
    r = convert_fails(run, src, tmp_path / "out")
    assert gone in r.stderr, f"stderr does not name the absent {gone}:\n{r.stderr}"


@pytest.mark.parametrize("arch,kind", SHARDED, ids=SHARDED_IDS)
def test_index_puts_a_tensor_in_the_wrong_shard(run, tmp_path, sets, arch, kind):
    src = tmp_path / "in"
    shutil.copytree(sets / arch / kind, src)
    index_path = src / ("pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json")
    index = read_json(index_path)
    files = meta(sets / arch)[f"{kind}_files"]
    dropped = meta(sets / arch)["dropped"]
    name = sorted(k for k, f in index["weight_map"].items() if f == files[0] and k not in dropped)[0]
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index, indent=2))
    r = convert_fails(run, src, tmp_path / "out")
    assert any(f in r.stderr for f in (index_path.name, files[0], files[1])), r.stderr


def test_a_huge_index_is_read_in_bounded_memory_and_refused(run, tmp_path):
    """An index of 400,000 names (about 10 MB, past any real model's) for one small shard: read straight into its
    map under a 512 MiB address-space cap, and refused for the names no shard holds, naming the index."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "set"
    folder.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, str(folder / "a.safetensors"))
    wm = {f"t.{i}.w": "a.safetensors" for i in range(400_000)}
    wm["model.norm.weight"] = "a.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    out = tmp_path / "out"
    r = run("convert", folder, out, timeout=60, mem_limit=512 << 20)
    assert r.returncode == 1, r.stderr
    assert "model.safetensors.index.json" in r.stderr and "no file of the set holds it" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())
