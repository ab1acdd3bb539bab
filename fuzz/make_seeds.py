"""Builds the fuzz seed corpora from the real fixtures (written by torch, DCP, megatron-core, transformers).

Owns: fuzz/corpus/<target>/ (committed, small). Run: .venv/bin/python fuzz/make_seeds.py
Only the standard library is needed: seeds are bytes cut from the fixture files, never made by ckptconv.
"""

import hashlib
import io
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIX = ROOT.parent / "tests" / "fixtures"
MAX = 64 << 10  # seeds stay small so the fuzzer mutates structure, not bulk data


def put(target, data, limit=MAX):
    if not data or len(data) > limit:
        return
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def deflated(data):
    """The zip `data` with every entry deflated, as Python's zipfile ZIP_DEFLATED re-zips it (fixed dates)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for i in src.infolist():
            dst.writestr(zipfile.ZipInfo(i.filename, date_time=(1980, 1, 1, 0, 0, 0)), src.read(i), zipfile.ZIP_DEFLATED)
    return out.getvalue()


def main():
    for p in sorted((FIX / "pt").glob("*.pt")) + sorted((FIX.parent / "hostile").glob("*.pt")):
        data = p.read_bytes()
        put("torch_file", data)
        if p.parent.name == "pt" and zipfile.is_zipfile(io.BytesIO(data)):
            put("torch_file", deflated(data))  # the same file re-zipped by a user: every entry deflated
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for n in z.namelist():
                    if n.endswith("data.pkl"):
                        put("pickle", z.read(n))
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, OSError):  # hostile zips Python refuses too
            put("pickle", data[:MAX])
    for p in sorted(FIX.glob("dcp/**/.metadata")) + sorted((FIX.parent / "hostile").glob("dcp/**/.metadata")):
        put("dcp_metadata", p.read_bytes())
        put("pickle", p.read_bytes())
    # Whole two-rank DCP folders, as the dcp_folder entry point splits them: the metadata's u32 length and
    # bytes, rank 0's file's u32 length and bytes, then rank 1's bytes (empty for one rank).
    metas = [*FIX.glob("dcp/**/.metadata"), *(FIX.parent / "hostile").glob("dcp/*/.metadata")]
    folders = sorted({p.parent for p in metas})
    for d in folders:
        files = {p.name for p in d.iterdir()}
        if not files <= {".metadata", "__0_0.distcp", "__1_0.distcp"}:
            continue  # other layouts (one file per item, more ranks) do not fit the entry point's folder
        names = (".metadata", "__0_0.distcp", "__1_0.distcp")
        meta, rank0, rank1 = ((d / n).read_bytes() if n in files else b"" for n in names)
        put("dcp_folder", len(meta).to_bytes(4, "little") + meta + len(rank0).to_bytes(4, "little") + rank0 + rank1,
            limit=256 << 10)
    for case in ["qwen2_tp2", "qwen3_tp2", "llama_tp2"]:
        ranks = sorted((FIX / "megatron" / case).glob("actor/iter_*/mp_rank_*/model_optim_rng.pt"))
        if len(ranks) == 2:
            a, b = ranks[0].read_bytes(), ranks[1].read_bytes()
            # The fuzz entry point reads rank 0's length first, then both files.
            put("megatron", len(a).to_bytes(4, "little") + a + b, limit=1 << 20)
    # Mixture-of-Experts rank files at EP 2 (mp_rank_00_000, mp_rank_00_001), as the megatron_moe entry point reads them
    for case in ["qwen3moe_ep2", "qwen3moe_grouped_ep2"]:
        ranks = sorted((FIX / "megatron_moe" / case).glob("actor/iter_*/mp_rank_*/model_optim_rng.pt"))
        if len(ranks) == 2:
            a, b = ranks[0].read_bytes(), ranks[1].read_bytes()
            put("megatron_moe", len(a).to_bytes(4, "little") + a + b, limit=1 << 20)
    # torch_dist folders of two TP ranks with two writer threads each, as the megatron_dist entry point splits
    # them: .metadata, common.pt, __0_0, __0_1 and __1_0.distcp as u32 length and bytes, then __1_1.distcp.
    names = (".metadata", "common.pt", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp")
    for it in sorted(FIX.glob("megatron*/*/actor_dist/iter_*")):  # dense, MoE (two EP ranks) and MLA
        if {p.name for p in it.iterdir()} != {*names, "metadata.json"}:
            continue  # other grids (PP=2: eight data files) do not fit the entry point's folder
        parts = [(it / n).read_bytes() for n in names]
        put("megatron_dist", b"".join(len(p).to_bytes(4, "little") + p for p in parts[:-1]) + parts[-1],
            limit=1 << 20)
    for p in sorted(FIX.glob("**/*.safetensors")):
        data = p.read_bytes()
        n = int.from_bytes(data[:8], "little")
        # The header plus a little data: enough for every structural check.
        put("safetensors_header", data[: 8 + n + 64])
        put("safetensors_header", data)
    # A Hugging Face set as the hf_set entry point reads it: the index's u32 length and bytes, shard 1's, shard 2.
    # Two shards of the FP8 fixture, with an index that maps their tensors (built from their headers here).
    f8 = FIX / "fp8" / "block128_st"
    shards = sorted(f8.glob("model-*.safetensors"))
    if len(shards) >= 2:
        import json
        a, b = shards[1].read_bytes(), shards[3 if len(shards) > 3 else 1].read_bytes()
        names = lambda d: [k for k in json.loads(d[8:8 + int.from_bytes(d[:8], "little")]) if k != "__metadata__"]
        wm = {**{k: "model-00001-of-00002.safetensors" for k in names(a)},
              **{k: "model-00002-of-00002.safetensors" for k in names(b)}}
        index = json.dumps({"metadata": {}, "weight_map": wm}).encode()
        put("hf_set", len(index).to_bytes(4, "little") + index + len(a).to_bytes(4, "little") + a + b, limit=1 << 20)
    bad = FIX / "hf_sets" / "bad" / "absent"
    if bad.is_dir():
        index = (bad / "model.safetensors.index.json").read_bytes()
        a = (bad / "model-00001-of-00002.safetensors").read_bytes()
        put("hf_set", len(index).to_bytes(4, "little") + index + len(a).to_bytes(4, "little") + a + a)
    # A ZeRO-3 tag folder of three ranks as the zero entry point reads it: model states, then ranks 0, 1, 2's partitions.
    z = FIX / "deepspeed" / "zero3_bf16_w3" / "ckpt" / "global_step2"
    if z.is_dir():
        parts = [(z / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes()]
        parts += [(z / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").read_bytes() for r in range(3)]
        put("zero", b"".join(len(p).to_bytes(4, "little") + p for p in parts[:-1]) + parts[-1], limit=2 << 20)
    # scan: the torch files above, two stacked pickles (the second names os.system: bytes only, never loaded), an
    # object-array .npy and an .npz of it deflated (numpy writes both; the payload is a plain list).
    for p in sorted((FIX / "pt").glob("*.pt"))[:3] + sorted((FIX.parent / "hostile").glob("*.pt"))[:6]:
        put("scan", p.read_bytes(), limit=1 << 20)
    put("scan", b"\x80\x02]q\x00.cos\nsystem\n(S'true'\ntR.")
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, np.array([[1, "a"], None], dtype=object), allow_pickle=True)
    put("scan", buf.getvalue())
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("a.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(), zipfile.ZIP_DEFLATED)
    put("scan", npz.getvalue())
    for t in ["pickle", "torch_file", "dcp_metadata", "dcp_folder", "megatron", "megatron_dist", "megatron_moe",
              "safetensors_header", "hf_set", "zero", "scan"]:
        n = len(list((ROOT / "corpus" / t).glob("*")))
        print(f"{t}: {n} seeds")


if __name__ == "__main__":
    main()
