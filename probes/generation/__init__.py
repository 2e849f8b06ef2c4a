"""Generation + capture: the sampler runs once per image, hooks record every step, one precision path."""
