"""Probe exports (safetensors + JSON): building and writing them, loading them without the trainer,
resolving a folder or W&B artifact, rebuilding the module that trained them."""
