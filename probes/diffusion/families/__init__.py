"""Every family of text-to-image model the probes read: SD 1.x/2.x, SDXL, SD3, PixArt-α/Σ, FLUX.

A layer is a module path plus a readout rule that turns the module's output into image tokens
``[batch, tokens, channels]`` on a spatial grid (:mod:`.readout`, :mod:`.layers`); a family says
which pipeline runs it, where its denoiser is, how classifier-free guidance lays out the batch and
how steps are reported (:mod:`.spec`); :class:`ReadoutCapture` captures
``[batch, step, half, tokens, channels]`` per layer exactly as
:class:`probes.generation.capture.ActivationCapture` does for the U-Net (:mod:`.capture`);
:mod:`.tiny` builds tiny random pipelines of each family offline, :mod:`.loading` loads any of
them (or the real ones) through ``from_pretrained``, :mod:`.run` makes one captured call, and
:mod:`.sizes` sizes the store of the real models from their configs.
"""
from probes.diffusion.families.capture import ReadoutCapture
from probes.diffusion.families.layers import (
    FamilyRegistry,
    ReadoutLayer,
    check_patterns,
    denoiser_registry,
    latent_hw,
    registry_for,
)
from probes.diffusion.families.readout import READOUTS, read_tokens, tokens_to_grid
from probes.diffusion.families.spec import CFG_LAYOUTS, FAMILIES, Family, family_of, get_family

__all__ = ["CFG_LAYOUTS", "FAMILIES", "READOUTS", "FamilyRegistry", "Family", "ReadoutCapture", "ReadoutLayer",
           "check_patterns", "denoiser_registry", "family_of", "get_family", "latent_hw", "read_tokens",
           "registry_for", "tokens_to_grid"]
