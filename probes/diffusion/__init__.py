"""Stage 1: the diffusion model: loading (hub, local folder or random architecture), tokenizer, layer registry."""
