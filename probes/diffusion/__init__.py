"""The diffusion model: loading (hub, local folder or random architecture), tokenizer, layer registry and
naming, the hook lifecycle."""
