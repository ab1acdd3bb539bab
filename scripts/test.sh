#!/usr/bin/env bash
# Runs every check and test: lints, both wasm builds, Rust tests, and the Python end-to-end suite
# that compares ckptconv's output with what real torch/safetensors/transformers read.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The core must build for the browser (no CLI) and for WASI (with the CLI).
cargo build --lib --no-default-features --target wasm32-unknown-unknown
cargo build --release --target wasm32-wasip1
cargo build --release

cargo nextest run --release --no-fail-fast
CKPTCONV="$PWD/target/release/ckptconv" .venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider
