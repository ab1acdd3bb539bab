#!/usr/bin/env bash
# Builds the browser engine: the web crate for wasm32-unknown-unknown, then wasm-bindgen (pinned to the crate's
# exact version, installed with cargo: wasm-pack would download binaries at run time) into web/pkg/, then
# wasm-opt from npm's binaryen when it is installed; and the WASI CLI that `npx ckptconv` runs. Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(grep -m1 -o 'wasm-bindgen = "=[0-9.]*"' web/Cargo.toml | grep -o '[0-9][0-9.]*')
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if ! wasm-bindgen --version 2>/dev/null | grep -q "$want"; then
  cargo install wasm-bindgen-cli --version "$want"
fi
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+simd128" \
  cargo build -p ckptconv-web --target wasm32-unknown-unknown --release
rm -rf web/pkg
wasm-bindgen target/wasm32-unknown-unknown/release/ckptconv_web.wasm --out-dir web/pkg --target web
opt=node_modules/.bin/wasm-opt
if [ -x "$opt" ]; then
  "$opt" -O3 --enable-bulk-memory --enable-nontrapping-float-to-int --enable-simd \
    web/pkg/ckptconv_web_bg.wasm -o web/pkg/ckptconv_web_bg.wasm
fi
# The CLI for `npx ckptconv` (js/cli.js): the WASI build with http(s) inputs read by its host.
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
cargo build --release --target wasm32-wasip1 --bin ckptconv --features host-url --target-dir target/npm-cli
cp target/npm-cli/wasm32-wasip1/release/ckptconv.wasm web/pkg/ckptconv_cli.wasm
ls -l web/pkg/ckptconv_web_bg.wasm web/pkg/ckptconv_cli.wasm
