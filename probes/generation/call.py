"""The arguments of one pipeline call, for any family: the one place they differ between families.

The store's generation (:func:`probes.generation.sampling.generate`), the manifest's timesteps and
the intervention's regeneration all call the stock pipeline with these:

- the prompts, steps, size, guidance scale and the reference's initial latents (``latents=``:
  ``torch.manual_seed(seed); torch.randn(1, C, h, w)`` on the CPU per image, unscaled: the pipeline
  scales by its scheduler's ``init_noise_sigma``, 1 for flow matching), packed 2x2 for FLUX as
  ``FluxPipeline`` packs its own;
- the unconditional prompt: ``negative_prompt`` for the CFG families; for FLUX only with true CFG
  (``true_cfg_scale > 1``: two calls per step), its guidance-distilled models otherwise run one
  pass and read no negative prompt;
- ``max_sequence_length`` for the T5 encoders (SD3, PixArt, FLUX), PixArt's resolution binning
  and caption cleaning off (the size asked for is the size generated, the prompt is the prompt);
- the step callback: ``callback_on_step_end(pipe, i, t, kwargs)`` everywhere except PixArt-α/Σ,
  whose pipelines still take ``callback(step, t, latents)``; both end up in the same function.

SD v1.x's call is exactly the one the store always made (same arguments, same images).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from probes.diffusion.families.layers import latent_hw
from probes.diffusion.families.spec import Family

#: ``callback_on_step_end``-shaped: (pipe, step index, timestep, tensors) -> tensors
StepCallback = Callable[[Any, int, Any, dict], dict]


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The reference's init: ``torch.manual_seed(seed); torch.randn(1, *shape)`` on the CPU, per image.

    Unscaled: the pipeline multiplies by the scheduler's ``init_noise_sigma`` itself.
    """
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def family_latents(pipe: Any, family: Family, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """The initial latents the pipeline takes as ``latents=`` (on the CPU, float32; packed for FLUX)."""
    denoiser = getattr(pipe, family.denoiser)
    h, w = latent_hw(family, pipe.vae_scale_factor, height, width)
    channels = int(denoiser.config.in_channels) // (4 if family.packed_latents else 1)
    lat = initial_latents(seeds, (channels, h, w))
    if family.packed_latents:
        lat = type(pipe)._pack_latents(lat, len(seeds), channels, h, w)
    return lat


def call_kwargs(family: Family, prompts: Sequence[str], steps: int, height: int, width: int, guidance_scale: float,
                negative_prompt: str, latents: torch.Tensor, true_cfg_scale: float = 1.0,
                max_sequence_length: int | None = None) -> dict[str, Any]:
    """The pipeline-call arguments for ``family`` (without the step callback)."""
    n = len(prompts)
    kw: dict[str, Any] = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                              height=height, width=width, latents=latents, output_type="np", **family.call_kwargs)
    if family.guidance == "distilled":
        if true_cfg_scale > 1:
            kw.update(true_cfg_scale=true_cfg_scale, negative_prompt=[negative_prompt] * n)
    else:
        if true_cfg_scale != 1.0:
            raise ValueError(f"generation.true_cfg_scale is FLUX's (two calls per step); model family {family.name} "
                             f"guides with guidance_scale: leave true_cfg_scale at 1")
        kw["negative_prompt"] = [negative_prompt] * n
    if max_sequence_length is not None:
        if family.is_unet:
            raise ValueError(f"generation.max_sequence_length applies to T5 text encoders; model family {family.name} "
                             f"has none: leave it unset")
        kw["max_sequence_length"] = max_sequence_length
    return kw


def step_callback_kwargs(family: Family, pipe: Any, on_step_end: StepCallback) -> dict[str, Any]:
    """The pipeline-call arguments that report every step to ``on_step_end``."""
    if family.legacy_callback:
        return {"callback": lambda i, t, latents: on_step_end(pipe, i, t, {"latents": latents}), "callback_steps": 1}
    return {"callback_on_step_end": on_step_end}

