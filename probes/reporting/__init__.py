"""A run's results (``results``: computed) and outputs (metrics.csv, plots, prediction panels, reports,
W&B: written)."""
