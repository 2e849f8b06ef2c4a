"""Layers of every family: a module path, a readout rule, channels and the token grid.

The U-Net families (SD 1.x, SD 2.x, SDXL) keep today's names and modules
(:meth:`probes.diffusion.layers.LayerRegistry.from_unet`: ``down0.0`` … ``up3.2``, and SDXL's
``down2.1.7`` where a transformer holds several blocks), read with the ``tokens`` rule
(:mod:`probes.diffusion.readout`). The
diffusion transformers get names per block, in forward order:

======================  =========================  ==================================  =============
family                  names (kind ``block``)     hooked module                       rule
======================  =========================  ==================================  =============
SD3 (MMDiT)             ``joint0`` … ``joint23``   ``transformer_blocks.i``            ``second``
PixArt-α/Σ              ``block0`` … ``block27``   ``transformer_blocks.i``            ``tokens``
FLUX                    ``joint0`` … ``joint18``   ``transformer_blocks.i``            ``second``
                        ``single0`` … ``single37`` ``single_transformer_blocks.i``     ``after_text``
======================  =========================  ==================================  =============

A block's output is the image stream's residual after the block (what the next block reads). The
kind ``attn`` adds each block's attention output for the image tokens, before gating and residual,
the transformers' counterpart of the U-Net's ``attn1.to_out.0``: ``joint7.attn`` (the joint
attention module, ``first`` item), ``single12.attn`` (``after_text``), ``block3.attn``
(PixArt's self-attention ``attn1.to_out.0``, ``tokens``).

Grids: image tokens sit on the latent grid divided by the token stride (2 for SD3 and PixArt's
2x2 patches and FLUX's 2x2 packing), in row-major order (tested on the embedders).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from probes.diffusion.families.spec import Family, get_family
from probes.diffusion.layers import LayerInfo, LayerRegistry, check_layer_patterns, vae_mid_channels, vae_mid_layer

#: layer kinds per architecture; the first is the default
TRANSFORMER_KINDS = ("block", "attn")
UNET_KINDS = ("attn1",)
#: plausible transformer depths, for checking patterns before a model is loaded
_MAX_BLOCKS = 64
#: per transformer family: (name prefix, module list, block rule, attention module, attention rule)
_STACKS: dict[str, tuple[tuple[str, str, str, str, str], ...]] = {
    "sd3": (("joint", "transformer_blocks", "second", "attn", "first"),),
    "flux": (("joint", "transformer_blocks", "second", "attn", "first"),
             ("single", "single_transformer_blocks", "after_text", "attn", "after_text")),
    "pixart": (("block", "transformer_blocks", "tokens", "attn1.to_out.0", "tokens"),),
}


def _stacks(family: Family) -> tuple[tuple[str, str, str, str, str], ...]:
    key = "pixart" if family.name.startswith("pixart") else family.name
    if key not in _STACKS:
        raise ValueError(f"model family {family.name} has no transformer layers")
    return _STACKS[key]


def _channels(model: nn.Module) -> int:
    cfg = model.config
    return int(cfg.num_attention_heads) * int(cfg.attention_head_dim)


def token_stride(family: Family, denoiser: nn.Module) -> int:
    """Latent pixels per token side: the patch size (SD3, PixArt), or 2 for FLUX's 2x2 packing
    (done by the pipeline, times the transformer's own ``patch_size``, 1 in every FLUX release)."""
    patch = int(getattr(denoiser.config, "patch_size", 1) or 1)
    return 2 * patch if family.packed_latents else patch


def transformer_registry(family: Family, denoiser: nn.Module, latent_hw: tuple[int, int],
                         kinds: Iterable[str] = ("block",)) -> LayerRegistry:
    """The blocks (and, with kind ``attn``, their attention outputs) of a diffusion transformer."""
    kinds = tuple(kinds)
    bad = sorted(set(kinds) - set(TRANSFORMER_KINDS))
    if bad:
        raise ValueError(f"unknown layer kinds {bad} for model family {family.name}; valid kinds: "
                         f"{', '.join(TRANSFORMER_KINDS)}")
    s = token_stride(family, denoiser)
    h, w = latent_hw
    if h % s or w % s:
        raise ValueError(f"a {h}x{w} latent does not split into {s}x{s} tokens ({family.name}); choose a height and "
                         f"width that are multiples of {s} x the VAE's scale factor")
    grid, channels = (h // s, w // s), _channels(denoiser)
    reg = LayerRegistry(family=family.name)
    for prefix, attr, rule, attn_path, attn_rule in _stacks(family):
        for i, _ in enumerate(getattr(denoiser, attr)):
            if "block" in kinds:
                reg.register(LayerInfo(f"{prefix}{i}", f"{attr}.{i}", channels, grid, rule))
            if "attn" in kinds:
                reg.register(LayerInfo(f"{prefix}{i}.attn", f"{attr}.{i}.{attn_path}", channels, grid, attn_rule))
    return reg


def unet_registry(family: Family, unet: nn.Module, latent_hw: tuple[int, int],
                  kinds: Iterable[str] = UNET_KINDS) -> LayerRegistry:
    """Today's U-Net layers (names, modules, grids unchanged: :meth:`LayerRegistry.from_unet`), read as
    tokens, in a registry that names the family in its errors."""
    return LayerRegistry(LayerRegistry.from_unet(unet, latent_hw, kinds), family=family.name)


def denoiser_registry(family: Family | str, denoiser: nn.Module, latent_hw: tuple[int, int],
                      kinds: Iterable[str] | None = None) -> LayerRegistry:
    """The layers of a family's denoiser at ``latent_hw`` (a model on the meta device will do: only
    its structure and config are read). ``kinds``: ``("block",)`` by default for transformers, add
    ``"attn"`` for the attention outputs; U-Nets have ``attn1`` by default and every kind of
    :data:`probes.diffusion.layers.ALL_KINDS` on request (the lens reads them)."""
    family = get_family(family) if isinstance(family, str) else family
    if family.is_unet:
        return unet_registry(family, denoiser, latent_hw, tuple(kinds or UNET_KINDS))
    return transformer_registry(family, denoiser, latent_hw, kinds or ("block",))


def latent_hw(family: Family | str, vae_scale_factor: int, height: int, width: int) -> tuple[int, int]:
    """The latent grid the pipeline denoises for an image of ``height`` x ``width``."""
    family = get_family(family) if isinstance(family, str) else family
    f = int(vae_scale_factor)
    if family.packed_latents:           # FluxPipeline.prepare_latents: 2 * (size // (f * 2))
        return 2 * (height // (f * 2)), 2 * (width // (f * 2))
    return height // f, width // f


def registry_for(pipe: Any, height: int, width: int, family: Family | str | None = None,
                 kinds: Iterable[str] | None = None) -> LayerRegistry:
    """The layers of a loaded pipeline at an image size (family read off the pipeline if not given)."""
    from probes.diffusion.families.spec import family_of

    family = family_of(pipe) if family is None else (get_family(family) if isinstance(family, str) else family)
    denoiser = getattr(pipe, family.denoiser)
    return denoiser_registry(family, denoiser, latent_hw(family, pipe.vae_scale_factor, height, width), kinds)


def pipeline_registry(pipe: Any, height: int, width: int) -> LayerRegistry:
    """The layers of a loaded pipeline of any family at an image size; for the U-Net families also the
    VAE decoder's ``vae.mid`` (opt-in: see :mod:`probes.diffusion.layers`)."""
    from probes.diffusion.families.spec import family_of

    family = family_of(pipe)
    registry = registry_for(pipe, height, width, family)
    vae = getattr(pipe, "vae", None)
    if family.is_unet and vae is not None and vae_mid_channels(vae) is not None:
        registry.register(vae_mid_layer(vae_mid_channels(vae), latent_hw(family, pipe.vae_scale_factor, height, width)))
    return registry


def plausible_names(family: Family | str, kinds: Iterable[str] | None = None) -> list[str]:
    """Names any model of a transformer family can have, for checking patterns before it is loaded."""
    family = get_family(family) if isinstance(family, str) else family
    if family.is_unet:
        return []
    kinds = tuple(kinds or ("block",))
    names = [f"{stack[0]}{i}" for stack in _stacks(family) for i in range(_MAX_BLOCKS)]
    return names + ([f"{n}.attn" for n in names] if "attn" in kinds else [])


def check_patterns(family: Family | str, patterns: str | Iterable[str], kinds: Iterable[str] | None = None,
                   option: str = "capture.layers") -> None:
    """Fail at config time on a layer pattern no model of the family can match (``jiont3``,
    ``down0.0`` for FLUX, ``single3`` for SD3), naming the family's layers. U-Net families check as
    :func:`probes.diffusion.layers.check_layer_patterns` (``kinds``: U-Net kinds)."""
    family = get_family(family) if isinstance(family, str) else family
    if family.is_unet:
        check_layer_patterns(patterns, kinds=tuple(kinds or UNET_KINDS), option=option)
        return
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    universe = plausible_names(family, kinds)
    for pat in pats:
        if pat in ("all", "*") or "blocks" in pat:       # everything, or a module-path pattern
            continue
        if not any(fnmatch.fnmatchcase(n, pat) for n in universe):
            shown = sorted({re.sub(r"\d+", "<i>", n) for n in universe})
            raise ValueError(f"{option}: {pat!r} names no layer of model family {family.name}; its layers are named "
                             f"{', '.join(shown)} (e.g. {universe[0]}); patterns like "
                             f"'{universe[0].rstrip('0')}*' or module paths like 'transformer_blocks.3*' also work")
