"""``make bench``: measured speed claims, written to BENCHMARKS.md; and the planted-signal store
(``planted``) the benchmark and the tests check probe code with."""
