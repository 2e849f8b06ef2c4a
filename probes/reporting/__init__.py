"""Stage 6: metrics.csv, plots, prediction panels, reports and W&B."""
