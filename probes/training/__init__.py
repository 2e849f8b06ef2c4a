"""Probes: the data module that wires the data stages, datasets, probe banks and the Lightning modules."""
