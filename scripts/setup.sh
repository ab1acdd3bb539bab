#!/usr/bin/env bash
# Installs everything the tests need: wasm targets, cargo-nextest, and a Python venv with torch,
# safetensors, transformers and pytest (the reference implementations the tests compare against).
# Idempotent: each step is skipped when its tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

installed=$(rustup target list --installed)
for t in wasm32-unknown-unknown wasm32-wasip1; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, safetensors, transformers, pytest, numpy, zstandard, peft" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r tests/requirements.txt
fi
echo "setup: ok"
