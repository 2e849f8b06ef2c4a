"""Layer registry: the self-attention layers of an SD-family U-Net, with stable short names.

Names are what people type in configs and read in dashboards, so they are short and stable:
``down{block}.{attention}``, ``mid.{attention}``, ``up{block}.{attention}`` (plus
``.{transformer_block}`` when a transformer has more than one block, as in SDXL). Each entry
records the hooked module (``attn1.to_out.0``: the attention's output projection, before dropout
and the residual add), its channel count and its token grid at the configured resolution.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch.nn as nn

_ATTN1 = re.compile(r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")


@dataclass(frozen=True)
class LayerInfo:
    """One probe-able layer. ``module`` is the path of the module whose output is captured."""

    name: str
    module: str
    channels: int
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(name=d["name"], module=d["module"], channels=int(d["channels"]), grid=tuple(d["grid"]))


def _block_resolutions(unet: nn.Module, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Token grid of each block, by walking the down/up samplers as the forward pass does."""
    h, w = latent_hw
    res: dict[str, tuple[int, int]] = {}
    for b, block in enumerate(unet.down_blocks):
        res[f"down{b}"] = (h, w)
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # stride-2 conv, padding 1
    res["mid"] = (h, w)
    for b, block in enumerate(unet.up_blocks):
        res[f"up{b}"] = (h, w)
        if getattr(block, "upsamplers", None):
            h, w = h * 2, w * 2
    return res


#: the 16 self-attention layers of SD v1.x, in forward order (what "all layers" means in the protocol)
SD14_LAYERS = ("down0.0", "down0.1", "down1.0", "down1.1", "down2.0", "down2.1", "mid.0",
               "up1.0", "up1.1", "up1.2", "up2.0", "up2.1", "up2.2", "up3.0", "up3.1", "up3.2")
_NAME_SYNTAX = re.compile(r"^(down\d+\.\d+|mid\.\d+|up\d+\.\d+)(\.\d+)?$")


def _plausible_names() -> list[str]:
    """Names any SD-family U-Net can have (4 blocks, up to 3 attentions, optional transformer depth)."""
    names = [f"{k}{b}.{a}" for k in ("down", "up") for b in range(4) for a in range(3)] + ["mid.0"]
    return names + [f"{n}.{d}" for n in names for d in range(10)]


def check_layer_patterns(patterns: str | Iterable[str]) -> None:
    """Fail at config time on a layer pattern no SD-family U-Net can match (typos like ``upp3.0``).

    Which of the plausible layers a model really has is checked again once it is loaded
    (:meth:`LayerRegistry.select`); this catches misspellings before any compute.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    universe = _plausible_names()
    for pat in pats:
        if pat in ("all", "*") or "blocks" in pat or "attn" in pat:   # "all", or a module-path pattern
            continue
        if not any(fnmatch.fnmatchcase(n, pat) for n in universe):
            raise ValueError(f"capture.layers: {pat!r} names no layer; layers are named down<block>.<attention>, "
                             f"mid.0, up<block>.<attention> (SD v1.4: {', '.join(SD14_LAYERS)}); patterns like "
                             f"'up*' or module paths like 'up_blocks.3.*' also work")


class LayerRegistry:
    """Ordered (forward order) set of layers; unknown names fail loudly with the valid ones."""

    def __init__(self, layers: Iterable[LayerInfo] = ()) -> None:
        self._layers: dict[str, LayerInfo] = {}
        for layer in layers:
            self.register(layer)

    @classmethod
    def from_unet(cls, unet: nn.Module, latent_hw: tuple[int, int]) -> LayerRegistry:
        """Discover every self-attention (``attn1``) of the U-Net at the given latent size."""
        grids = _block_resolutions(unet, latent_hw)
        found: dict[str, list[tuple[int, int, str, nn.Module]]] = {}
        for path, module in unet.named_modules():
            m = _ATTN1.match(path)
            if not m:
                continue
            kind, block, attn, tb = m.groups()
            prefix = f"{kind}{block}" if kind else "mid"
            found.setdefault(prefix, []).append((int(attn), int(tb), path, module))
        order = [f"down{b}" for b in range(len(unet.down_blocks))] + ["mid"] + \
                [f"up{b}" for b in range(len(unet.up_blocks))]
        reg = cls()
        for prefix in order:
            entries = sorted(found.get(prefix, []), key=lambda e: (e[0], e[1]))
            depth = max((e[1] for e in entries), default=0) + 1
            for attn, tb, path, module in entries:
                name = f"{prefix}.{attn}" if depth == 1 else f"{prefix}.{attn}.{tb}"
                reg.register(LayerInfo(name=name, module=f"{path}.to_out.0",
                                       channels=int(module.to_out[0].out_features), grid=grids[prefix]))
        if not reg._layers:
            raise ValueError("no self-attention (attn1) layers found: is this an SD-family UNet2DConditionModel?")
        return reg

    def register(self, layer: LayerInfo) -> None:
        """Add a layer (e.g. a cross-attention or a VAE attention someone wants to probe)."""
        if layer.name in self._layers:
            raise ValueError(f"layer {layer.name!r} is already registered")
        self._layers[layer.name] = layer

    def names(self) -> list[str]:
        return list(self._layers)

    def list(self, pattern: str = "*") -> list[str]:
        """Names (forward order) whose short name or module path matches the fnmatch pattern."""
        return [n for n, info in self._layers.items()
                if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(info.module, pattern)]

    def get(self, name: str) -> LayerInfo:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; valid layers: {', '.join(self._layers)}") from None

    def select(self, patterns: str | Iterable[str] = "*") -> list[LayerInfo]:
        """Layers matching any pattern, in forward order. A pattern that matches nothing is an error."""
        if isinstance(patterns, str):
            patterns = ["*"] if patterns == "all" else [patterns]
        chosen: set[str] = set()
        for pat in patterns:
            hits = self.list(pat)
            if not hits:
                raise KeyError(f"layer {pat!r} matches no layer; valid layers: {', '.join(self._layers)} "
                               f"(patterns like 'up*' or 'up_blocks.3.*' also work)")
            chosen.update(hits)
        return [info for n, info in self._layers.items() if n in chosen]

    def __iter__(self):
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)
