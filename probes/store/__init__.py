"""Stage 3: the activation store: manifest, memory-mapped arrays, per-sample commits."""
