"""Data side of the pipeline: prompts -> generation + capture -> activation store -> labels."""
