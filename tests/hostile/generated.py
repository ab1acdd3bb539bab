"""Hostile inputs too big to commit, built at test time from real libraries. Imported by tests/e2e/test_hostile.py
(native) and wasi/test_wasi.py (under wasmtime).

Owns: tests/hostile/generated.py.
"""

import io
import pickle
import warnings


def many_inflating_zstd_items(folder, n=32):
    """A DCP folder of `n` zstd items that each stay under the per-item 1024x but together inflate past 64x plus
    1 GiB: a real single-process `dcp.save` with torch's ZStandard extension writes the .metadata for n tiny tensors,
    and each item is then replaced by zstd (the `zstandard` package, as that extension uses) of a real `torch.save`
    of a 4-element view of a 40 MiB storage (torch.save keeps the whole storage; dcp.save would have compacted
    it): about 66 kB each, 40 MiB decoded, so 32 items decode 1.3 GB from 2.1 MB. Too big to commit; made here."""
    import torch
    import torch.distributed.checkpoint as dcp
    import zstandard
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        state = {f"model.layers.{i}.weight": torch.zeros(4) for i in range(n)}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, _extensions=[ZStandard()]), no_dist=True)
    big = torch.zeros(10 * 2**20)
    big[::1024] = torch.randn(10 * 2**10, generator=torch.Generator().manual_seed(3))
    raw = io.BytesIO()
    torch.save(big[:4], raw)
    item = zstandard.ZstdCompressor().compress(raw.getvalue())
    assert 64 * len(item) < len(raw.getvalue()) < 1024 * len(item), (len(raw.getvalue()), len(item))
    md = pickle.loads((folder / ".metadata").read_bytes())
    for k, i in zip(sorted(md.storage_data, key=lambda k: k.fqn), range(n)):
        v = md.storage_data[k]
        md.storage_data[k] = _StorageInfo(relative_path="__0_0.distcp", offset=i * len(item), length=len(item),
                                          transform_descriptors=v.transform_descriptors)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    for p in folder.glob("*.distcp"):
        p.unlink()
    (folder / "__0_0.distcp").write_bytes(item * n)
    return raw.getvalue()
