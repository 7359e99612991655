"""Benchmarks: `make bench` runs `python -m bench.pipeline`; see bench/README.md."""
