"""ckptconv-ray: one ckptconv conversion run as N parts on a Ray cluster, each part writing its own share of the
output's data files (safetensors shards or torch.save files), then finished on the driver.

Owns: python/ckptconv_ray/__init__.py (the package's documentation). The driver is driver.py; __main__.py runs it:

  python -m ckptconv_ray IN OUT --parts N [--address ADDR] [--num-cpus C]
      [--ckptconv PATH | --wasm MODULE.wasm [--wasmtime CMD]] [--max-retries R] [--jobs J] [--memory BYTES]
      [--verify] [--force] [--quiet] [--timings FILE] [convert flags, e.g. --base DIR --max-shard-size 500MB]

IN and OUT come first: anything the driver does not know is passed verbatim to `ckptconv convert IN OUT`, and a
flag taking a value before IN would take IN as its value.

What the cluster needs:
  - every node sees IN, OUT and the folders of --base / --lora-path at the same absolute paths (a shared
    filesystem), and has the ckptconv binary (or the WASI module and its runner) at the same path;
  - the same ray version as the driver. ckptconv_ray itself need not be installed on the workers: its task and
    exceptions are sent to them by value;
  - a cluster with Ray's token authentication: RAY_AUTH_MODE=token and the token where Ray looks for it
    (~/.ray/auth_token or RAY_AUTH_TOKEN), as Ray asks of any driver given an address.
Without --address the driver starts a local cluster (--num-cpus CPUs, no dashboard) and stops it at the end.
Each part's task declares --jobs CPUs and --memory bytes, so Ray runs as many parts at once as the nodes hold.

From Python, e.g. a service converting many checkpoints on one connection (Ray's worker processes are then started
once, not per conversion):

  ray.init(address="auto")
  ckptconv_ray.convert_checkpoint("/shared/in/actor", "/shared/out/hf", 8, ["--max-shard-size", "5GB"],
                                  ckptconv="/shared/bin/ckptconv", quiet=True)

The same conversion without Ray: scripts/slurm/ (an array job of parts, then the finishing step).
"""

from ckptconv_ray.driver import DriverError, convert_checkpoint

__all__ = ["DriverError", "convert_checkpoint"]
