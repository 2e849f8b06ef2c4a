"""Probe side of the pipeline: linear probes per (step, layer), metrics, plots and export."""
