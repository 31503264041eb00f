"""Benchmark scripts: ``python -m benchmarks.<name>``; results land in ``benchmarks/results/``."""
