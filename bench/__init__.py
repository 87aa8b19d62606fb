"""The benchmark of issue #8: `python bench/run.py` from the repository root (see README, Benchmark)."""
