#!/usr/bin/env bash
# Runs every check and test: lints, both wasm builds (WASI CLI and browser engine), the Rust tests, the Python
# end-to-end suites (native CLI against torch/transformers/peft, and the WASI build byte for byte against
# native), and the browser tests in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
# On failure, print what the machine had (a full disk or a memory limit explains many odd failures).
trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "--- test.sh failed (exit $rc); machine:"; df -h . /tmp; free -m; fi' EXIT

cargo fmt --all --check
cargo clippy --all-targets -- -D warnings
# The core must build for the browser (no CLI) and for WASI (with the CLI).
cargo build --lib --no-default-features --target wasm32-unknown-unknown
cargo clippy -p ckptconv-web --target wasm32-unknown-unknown -- -D warnings
cargo build --release
bash wasi/build.sh
bash web/build.sh

cargo nextest run --release --no-fail-fast
if [ -d web/test ]; then
  node --test web/test/
fi
CKPTCONV="$PWD/target/release/ckptconv" .venv/bin/python -m pytest tests/e2e wasi -q -p no:cacheprovider
