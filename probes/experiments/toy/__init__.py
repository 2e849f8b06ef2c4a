"""Toy-world measurements of a model's samples (do they look like the world?)."""
