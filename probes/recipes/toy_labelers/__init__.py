"""The toy labelers' training (``train``) and their held-out scores (``evaluate``)."""
