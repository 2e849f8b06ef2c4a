"""Stage 6: metrics of probes (exact, from token-level predictions) and of baselines."""
