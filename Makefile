.PHONY: setup test sample bench

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/test.sh

sample:
	cargo run --release -- convert tests/fixtures/sample/full_weights.pt out/sample --force

bench: setup
	cargo build --release
	.venv/bin/python bench/bench_pt.py
