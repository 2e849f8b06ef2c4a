"""Stage 6: probe export (safetensors + JSON) and loading without the trainer."""
