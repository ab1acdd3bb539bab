.PHONY: setup test sample bench bench-all

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/test.sh

sample:
	cargo run --release -- convert tests/fixtures/sample/full_weights.pt out/sample --force

bench: setup
	cargo build --release
	.venv/bin/python bench/bench_pt.py

bench-all: setup
	cargo build --release
	bash wasi/build.sh
	bash web/build.sh
	.venv/bin/python bench/bench_pt.py
	.venv/bin/python bench/bench_dcp.py
	.venv/bin/python bench/bench_megatron.py
	.venv/bin/python bench/bench_megatron.py --format torch_dist
	.venv/bin/python bench/bench_moe.py
	.venv/bin/python bench/bench_lora.py
	.venv/bin/python bench/bench_io.py
	.venv/bin/python bench/bench_wasi.py
	.venv/bin/python bench/bench_scale.py
	.venv/bin/python bench/bench_parts.py
	node bench/bench_web.mjs
