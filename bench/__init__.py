"""Benchmarks: each ``bench_*.py`` module measures ratios side by side in one run."""
