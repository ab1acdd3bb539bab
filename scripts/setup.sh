#!/usr/bin/env bash
# Installs everything the tests need, each step skipped when already there:
# - Rust: the two wasm targets, cargo-nextest, and wasm-bindgen-cli at the web crate's pinned version;
# - Debian's Chromium (the browser tests drive it with npm playwright-core);
# - npm packages from package-lock.json;
# - a Python venv with the reference implementations the tests compare against (torch, safetensors,
#   transformers, peft, megatron-core, zstandard, deepspeed; transformers 4 in .venv/transformers4), PyPI's
#   wasmtime engine for the WASI tests, picklescan and fickling, and Ray (the scale-out driver's tests);
# - the public malicious-pickle corpora of tests/security/fetch_corpora.py.
set -euo pipefail
cd "$(dirname "$0")/.."

installed=$(rustup target list --installed)
for t in wasm32-unknown-unknown wasm32-wasip1; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked

want=$(grep -m1 -o 'wasm-bindgen = "=[0-9.]*"' web/Cargo.toml | grep -o '[0-9][0-9.]*')
wasm-bindgen --version 2>/dev/null | grep -q "$want" || cargo install wasm-bindgen-cli --version "$want"

if ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ -f package-lock.json ]; then
  stamp=node_modules/.lock-stamp
  if ! [ -f "$stamp" ] || ! cmp -s package-lock.json "$stamp"; then
    npm ci --no-audit --no-fund
    cp package-lock.json "$stamp"
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, safetensors, transformers, pytest, numpy, zstandard, peft, megatron.core, wasmtime, deepspeed, picklescan, fickling, ray" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --upgrade pip
  DS_BUILD_OPS=0 .venv/bin/pip install --quiet -r tests/requirements.txt
fi
# transformers 4 in a side folder (only the fixture script that writes pytorch_model.bin imports it)
if ! PYTHONPATH=.venv/transformers4 .venv/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.3')" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --no-deps --upgrade --target .venv/transformers4 -r tests/requirements-transformers4.txt
fi
# The public malicious-pickle corpora (picklescan's, fickling's and modelscan's kinds) the pickle policy tests read:
# downloaded from PyPI and built once into tests/security/.corpora/ (a no-op when current).
.venv/bin/python tests/security/fetch_corpora.py --quiet
echo "setup: ok"
