"""End-to-end tests of `ckptconv verify` and `convert --verify`: what they accept and what they find.

Owns: tests/e2e/test_verify.py. The outputs are damaged here with plain file edits, and where the damage sits is
worked out from the safetensors header and torch's reading of the input, never from ckptconv.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, INDEX, load_output, read_header

PT = FIXTURES / "pt" / "qwen2_tiny_full_weights.pt"
DCP = FIXTURES / "dcp" / "fsdp2_ws2" / "global_step_1"
MG = FIXTURES / "megatron" / "qwen2_tp2_pp2"
LORA = FIXTURES / "lora"

# (id, the conversion's arguments after the output folder, the same plan's flags for `verify --against`)
CASES = [
    ("pt-sharded-bf16", ["convert", PT], ["--max-shard-size", "20KB", "--dtype", "bf16"], ["--dtype", "bf16"]),
    ("dcp", ["convert", DCP], [], []),
    ("megatron-tp2-pp2", ["mg2hf", MG / "actor"], [MG / "base_hf"], ["--base", MG / "base_hf"]),
    ("lora-merge", ["convert", LORA / "full_weights.pt"], ["--base", LORA / "base_qwen2"], ["--base", LORA / "base_qwen2"]),
    ("lora-adapter", ["convert", LORA / "full_weights.pt"], ["--base", LORA / "base_qwen2", "--lora", "adapter"],
     ["--base", LORA / "base_qwen2", "--lora", "adapter"]),
]


def converted(run, out, head, tail):
    """Runs `ckptconv <head...> OUT <tail...> --verify`; returns its stderr."""
    r = run(*head, out, *tail, "--verify", "--quiet")
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("head,tail,plan", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_format_verifies_against_its_input(run, tmp_path, head, tail, plan):
    out = tmp_path / "out"
    stderr = converted(run, out, head, tail)
    # Counted by safetensors' own reader: the check covered every tensor written.
    tensors = load_file(out / "lora_adapter" / "adapter_model.safetensors") if "adapter" in tail else load_output(out)
    assert f", {len(tensors)} tensors, " in stderr and "every byte compared with the input" in stderr, stderr
    r = run("verify", out, "--against", head[-1], *plan)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and f", {len(tensors)} tensors, " in r.stdout, r.stdout
    assert "every byte compared with the input" in r.stdout, r.stdout


@pytest.fixture
def sharded(run, tmp_path):
    out = tmp_path / "out"
    converted(run, out, ["convert", PT], ["--max-shard-size", "20KB"])
    return out


def test_a_flipped_bit_is_found_at_its_element(run, sharded):
    index = json.loads((sharded / INDEX).read_text())
    name, element = "model.layers.0.self_attn.q_proj.weight", 123
    shard = sharded / index["weight_map"][name]
    header, data_start = read_header(shard)
    assert header[name]["dtype"] == "F32"
    at = data_start + header[name]["data_offsets"][0] + element * 4 + 1
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x04
    shard.write_bytes(data)
    # torch sees the damage at that element and nowhere else.
    want = torch.load(PT, weights_only=True)[name].reshape(-1)
    got = load_output(sharded)[name].reshape(-1)
    assert (got != want).nonzero().flatten().tolist() == [element]

    # The structure is intact: the structural check passes, the comparison with the input does not.
    r = run("verify", sharded)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stderr
    r = run("verify", sharded, "--against", PT)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        f"ckptconv: error[verify]: {shard}: verification failed: tensor '{name}' differs from the input at element "
        f"{element} (byte {at} of {shard.name})"
    )


def test_an_index_that_disagrees_with_its_shards_is_named(run, sharded):
    path = sharded / INDEX
    index = json.loads(path.read_text())
    index["metadata"]["total_size"] += 2
    path.write_text(json.dumps(index))
    for args in ([], ["--against", PT]):
        r = run("verify", sharded, *args)
        assert r.returncode == 1, r.stderr
        size = sum(t.numel() * t.element_size() for t in torch.load(PT, weights_only=True).values())
        assert f"error[verify]: {path}: verification failed: total_size is {size + 2} but the tensors hold {size} bytes" \
            in r.stderr, r.stderr


def test_a_shard_with_bytes_past_its_data_is_named(run, sharded):
    shard = sorted(sharded.glob("*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes() + b"\0")
    r = run("verify", sharded)
    assert r.returncode == 1
    assert f"error[verify]: {shard}: verification failed: bad safetensors file: data ends at" in r.stderr, r.stderr


def test_another_plan_is_refused_by_dtype_and_by_name(run, sharded):
    r = run("verify", sharded, "--against", PT, "--dtype", "bf16")
    assert r.returncode == 1
    assert "error[verify]" in r.stderr and "is F32 [" in r.stderr and "here but BF16 [" in r.stderr, r.stderr
    other = FIXTURES / "pt" / "parameters.pt"
    names = sorted(torch.load(other, weights_only=True))
    r = run("verify", sharded, "--against", other)
    assert r.returncode == 1
    assert f"error[verify]: {sharded}: verification failed: the output holds 27 tensors, the input gives {len(names)}" \
        in r.stderr, r.stderr
    assert "missing from the output: " + ", ".join(names[:5]) in r.stderr, r.stderr


def test_verify_changes_nothing(run, sharded):
    before = {p.name: p.read_bytes() for p in sharded.iterdir()}
    assert run("verify", sharded, "--against", PT).returncode == 0
    assert {p.name: p.read_bytes() for p in sharded.iterdir()} == before
