#!/usr/bin/env bash
# Builds the WASI release artifact: the same ckptconv CLI compiled for wasm32-wasip1 (no threads, no mmap).
# Output: target/wasi/ckptconv.wasm (override with CKPTCONV_WASM_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
cargo build --release --target wasm32-wasip1 --bin ckptconv
out="${CKPTCONV_WASM_OUT:-target/wasi/ckptconv.wasm}"
mkdir -p "$(dirname "$out")"
cp target/wasm32-wasip1/release/ckptconv.wasm "$out"
echo "$out"
