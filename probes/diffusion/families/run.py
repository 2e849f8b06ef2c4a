"""One pipeline call of any family with capture: prompts and seeds -> images + per-step activations.

The family-specific arguments of a call live here, in one place: the negative prompt and guidance
(true CFG for FLUX), T5 sequence length, PixArt's resolution binning and caption cleaning off,
the step callback, and the initial latents. The latents follow the project's convention
(``torch.manual_seed(seed); torch.randn(1, C, h, w)`` on the CPU per image, unscaled: the pipeline
scales by its scheduler's ``init_noise_sigma``, 1 for flow matching); FLUX's are then packed 2x2 as
``FluxPipeline`` packs its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from probes.diffusion.families.capture import ReadoutCapture
from probes.diffusion.families.layers import latent_hw
from probes.diffusion.families.spec import Family, family_of, get_family
from probes.diffusion.layers import LayerInfo
from probes.generation.sampling import initial_latents


@dataclass
class FamilyBatch:
    """What one call produced. ``acts``: layer -> ``[batch, captured steps, halves, tokens, channels]``."""

    images: np.ndarray                          # [B, H, W, 3] uint8
    acts: dict[str, torch.Tensor]
    steps: list[int]                            # captured step indices
    timesteps: list[float | None]               # the scheduler's timestep at every step (None: not captured)
    sigmas: list[float | None]                  # the scheduler's sigma at every step, where it has sigmas
    denoiser_calls: int
    cfg: str                                    # the CFG layout of the call
    halves: list[str] = field(default_factory=lambda: ["cond"])


def family_latents(pipe: Any, family: Family, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """The initial latents the pipeline takes as ``latents=`` (packed for FLUX)."""
    denoiser = getattr(pipe, family.denoiser)
    h, w = latent_hw(family, pipe, height, width)
    channels = int(denoiser.config.in_channels) // (4 if family.packed_latents else 1)
    lat = initial_latents(seeds, (channels, h, w))
    if family.packed_latents:
        lat = type(pipe)._pack_latents(lat, len(seeds), channels, h, w)
    return lat


def call_kwargs(pipe: Any, family: Family, prompts: Sequence[str], seeds: Sequence[int], steps: int, height: int,
                width: int, guidance_scale: float, negative_prompt: str | None, true_cfg_scale: float,
                max_sequence_length: int | None) -> dict[str, Any]:
    """The pipeline-call arguments for ``family`` (without the step callback)."""
    kw: dict[str, Any] = dict(prompt=list(prompts), num_inference_steps=steps, height=height, width=width,
                              guidance_scale=guidance_scale, output_type="np", **family.call_kwargs)
    if family.guidance == "distilled":
        if true_cfg_scale > 1:
            kw.update(true_cfg_scale=true_cfg_scale, negative_prompt=[negative_prompt or ""] * len(prompts))
    elif negative_prompt is not None:
        kw["negative_prompt"] = [negative_prompt] * len(prompts)
    if max_sequence_length is not None:
        if family.is_unet:
            raise ValueError(f"max_sequence_length applies to T5 text encoders; model family {family.name} has none")
        kw["max_sequence_length"] = max_sequence_length
    dtype = getattr(pipe, family.denoiser).dtype
    kw["latents"] = family_latents(pipe, family, seeds, height, width).to(pipe.device, dtype)
    return kw


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], layers: Sequence[LayerInfo] = (), *,
             family: Family | str | None = None, steps: int = 4, height: int = 32, width: int = 32,
             guidance_scale: float = 5.0, negative_prompt: str | None = "", true_cfg_scale: float = 1.0,
             max_sequence_length: int | None = None, scheduler: str | None = None, capture_steps: Sequence[int] | None = None,
             halves: str = "cond", dtype: torch.dtype = torch.float16, acts_device: str | None = "cpu",
             capture: bool = True, then: Any = None) -> FamilyBatch:
    """Generate ``len(prompts)`` images in one call, capturing ``layers`` (``capture=False``: no hooks
    at all, for the bit-identity check). ``then``: an extra ``callback_on_step_end``-style function
    called after the capture's at every step. ``scheduler``: a diffusers scheduler class to build from
    the model's own scheduler config (e.g. ``LMSDiscreteScheduler``, the protocol's: one denoiser
    call per step; PNDM, SD v1.x's default, makes one more call than it has steps)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family = family_of(pipe) if family is None else (get_family(family) if isinstance(family, str) else family)
    if scheduler is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    kw = call_kwargs(pipe, family, prompts, seeds, steps, height, width, guidance_scale, negative_prompt,
                     true_cfg_scale, max_sequence_length)
    cfg = family.cfg_layout(guidance_scale, true_cfg_scale, negative_prompt is not None)
    denoiser = getattr(pipe, family.denoiser)
    cap = ReadoutCapture(denoiser, layers, steps, capture_steps, halves, dtype, cfg)
    if capture:
        kw.update(cap.step_callback_kwargs(pipe, family, then))
    elif then is not None:
        kw.update(ReadoutCapture(denoiser, [], steps).step_callback_kwargs(pipe, family, then))
    with torch.inference_mode():
        if capture:
            with cap:
                out = pipe(**kw)
        else:
            out = pipe(**kw)
    images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    acts = cap.collect(acts_device) if capture and layers else {}
    return FamilyBatch(images=images, acts=acts, steps=list(cap.steps), timesteps=list(cap.timesteps),
                       sigmas=list(cap.sigmas), denoiser_calls=cap.unet_calls, cfg=cfg,
                       halves=["cond"] if halves == "cond" else ["uncond", "cond"])
