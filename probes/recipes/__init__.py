"""How the toy world's shipped weights were made: the labelers (``toy_labelers``) and the diffusion
model (``toy_model``); resumable, seeded (``make toy-model``)."""
