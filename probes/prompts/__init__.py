"""Prompt sets: (prompt, seed, split) records from the reference split, a CSV or a text file."""
