"""How big a store gets per image for the real models, from their configs, before any download.

The denoiser is built on the meta device from the fields of its config that fix the layers
(``data/architectures/families/real.yaml``: no weights, no network), its registry lists the
layers at the model's native resolution, and a store holds, per image,
``sum over layers (tokens x channels) x captured steps x halves x bytes per value`` (float16: 2).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from probes.diffusion.families.layers import denoiser_registry, latent_hw
from probes.diffusion.families.spec import get_family
from probes.diffusion.families.tiny import FAMILY_ARCH_DIR
from probes.diffusion.layers import LayerInfo, LayerRegistry

REAL_MODELS_FILE = FAMILY_ARCH_DIR / "real.yaml"


def real_models() -> dict[str, dict[str, Any]]:
    """The real models' layer-fixing configs (see the module docstring), by Hub id."""
    with open(REAL_MODELS_FILE) as f:
        return yaml.safe_load(f)


def real_model(model_id: str) -> dict[str, Any]:
    models = real_models()
    if model_id not in models:
        raise KeyError(f"no layer config for {model_id!r}; known models: {', '.join(models)}")
    return models[model_id]


def meta_denoiser(cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The denoiser built on the meta device (structure only; instant, no memory)."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def real_registry(model_id: str, height: int | None = None, width: int | None = None,
                  kinds: Iterable[str] | None = None) -> LayerRegistry:
    """The layers of a real model at ``height`` x ``width`` (default: its native resolution)."""
    entry = real_model(model_id)
    family = get_family(entry["family"])
    h, w = height or entry["native"], width or entry["native"]
    den = meta_denoiser(entry["denoiser"]["class"], entry["denoiser"]["config"])
    return denoiser_registry(family, den, latent_hw(family, int(entry["vae_scale_factor"]), h, w), kinds)


def bytes_per_image(layers: Sequence[LayerInfo], steps: int, halves: int = 1, bytes_per_value: int = 2) -> int:
    """Store bytes of one image: every layer's tokens x channels, per captured step and half."""
    return sum(layer.tokens * layer.channels for layer in layers) * steps * halves * bytes_per_value


@dataclass
class SizeRow:
    model_id: str
    family: str
    resolution: int
    layers: int
    tokens: str             # distinct token counts, e.g. "4096" or "1024..9216"
    channels: str
    per_step: int           # bytes per image and captured step, cond half, float16
    usual_steps: int
    protocol_steps: int

    @property
    def per_image_usual(self) -> int:
        return self.per_step * self.usual_steps

    @property
    def per_image_protocol(self) -> int:
        return self.per_step * self.protocol_steps


def _span(values: Iterable[int]) -> str:
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}..{v[-1]}"


def size_table(protocol_steps: int = 15, kinds: Iterable[str] | None = None) -> list[SizeRow]:
    """One row per real model: all default layers at native resolution, cond half, float16."""
    rows = []
    for model_id, entry in real_models().items():
        layers = list(real_registry(model_id, kinds=kinds))
        rows.append(SizeRow(model_id, entry["family"], int(entry["native"]), len(layers),
                            _span(x.tokens for x in layers), _span(x.channels for x in layers),
                            bytes_per_image(layers, 1), int(entry["usual_steps"]), protocol_steps))
    return rows
