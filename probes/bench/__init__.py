"""``make bench``: measured speed claims, written to BENCHMARKS.md."""
