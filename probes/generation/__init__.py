"""Stage 2: generation + capture. The sampler runs once per image and hooks record every step."""
