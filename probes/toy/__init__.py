"""A procedural 3D toy world with exact ground truth, for probing a tiny diffusion model offline."""
