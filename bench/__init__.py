"""The benchmark: `python bench/run.py` from the repository root (see docs/benchmark.md)."""
