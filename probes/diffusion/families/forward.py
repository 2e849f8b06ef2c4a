"""One denoiser pass of any family on a given latent: what the semantic lens reads features from.

The lens does not sample: it noises an existing image's latent to a timestep and runs the
denoiser once (:mod:`probes.experiments.lens.features`). A U-Net takes ``(latent, t, text)``; the
other families' denoisers take more, and each its own way, so this module is the one place that
knows it, as the families' pipelines do it in their loops (diffusers 0.42):

=============  ==================================================================================
family         inputs of one pass (besides the latent)
=============  ==================================================================================
sd1, sd2       ``t``, CLIP tokens
sdxl           ``t``, both CLIP encoders' tokens, ``added_cond_kwargs``: pooled text and the
               size/crop time ids (original = target = the image size, crop 0, 0)
sd3            ``t`` (0…1000), CLIP + T5 tokens, pooled CLIP text
pixart_*       ``t``, T5 tokens and their attention mask, resolution/aspect ratio (1024 px models
               only); the output's learned-variance half is dropped
flux           ``t / 1000``, T5 tokens, pooled CLIP text, text and image position ids; the latent
               is packed 2x2 on the way in and unpacked on the way out; guidance ``g`` when the
               model embeds it (FLUX.1-dev)
=============  ==================================================================================

The noise schedule differs too (the lens applies it: :class:`probes.experiments.lens.features.FeatureExtractor`):
DDPM-type models are noised with their training ``alphas_cumprod`` and predict the noise (or v);
the flow-matching families (SD3, FLUX) interpolate ``x_t = (1 - sigma) x_0 + sigma noise`` with
``sigma = t / 1000`` (:func:`flow_sigma`) and predict the velocity ``noise - x_0``.
"""
from __future__ import annotations

from typing import Any

import torch

from probes.diffusion.families.spec import Family


def encode_condition(pipe: Any, family: Family, prompt: str, device: torch.device | str,
                     max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
    """The text conditioning of one prompt, as the family's denoiser takes it (batch 1)."""
    msl = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if family.name in ("sd1", "sd2"):
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return {"encoder_hidden_states": embeds}
    if family.name == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    if family.name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, **msl)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if family.name.startswith("pixart"):
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, **msl)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if family.name == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt, device=device, num_images_per_prompt=1, **msl)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    raise ValueError(f"no denoiser pass for model family {family.name}")


def _expand(cond: dict[str, torch.Tensor], n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in cond.items():
        if k == "txt_ids":                                 # positions: no batch dimension
            out[k] = v
        elif k == "encoder_attention_mask":
            out[k] = v.expand(n, *v.shape[1:])
        else:
            out[k] = v.to(dtype).expand(n, *v.shape[1:])
    return out


def denoiser_pass(pipe: Any, family: Family, latents: torch.Tensor, t: float | int,
                  cond: dict[str, torch.Tensor], guidance: float = 3.5) -> torch.Tensor:
    """The denoiser's prediction for ``latents`` ``[B, C, h, w]`` at timestep ``t`` (the training
    scale, 0…1000), in the latent's layout: the noise (or v) for DDPM-type families, the velocity
    for flow matching. ``guidance``: FLUX.1-dev's embedded guidance scale (ignored by the others)."""
    den = getattr(pipe, family.denoiser)
    n, dtype, device = latents.shape[0], den.dtype, latents.device
    c = _expand(cond, n, dtype)
    x = latents.to(dtype)
    if family.is_unet:
        ts = torch.full((n,), t, device=device, dtype=torch.long)
        extra: dict[str, Any] = {}
        if family.name == "sdxl":
            h, w = x.shape[-2] * pipe.vae_scale_factor, x.shape[-1] * pipe.vae_scale_factor
            proj = int(c["text_embeds"].shape[-1])
            ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=dtype, text_encoder_projection_dim=proj)
            extra["added_cond_kwargs"] = {"text_embeds": c["text_embeds"], "time_ids": ids.to(device).expand(n, -1)}
        return den(x, ts, encoder_hidden_states=c["encoder_hidden_states"], **extra).sample
    if family.name == "sd3":
        ts = torch.full((n,), float(t), device=device, dtype=dtype)
        return den(hidden_states=x, timestep=ts, encoder_hidden_states=c["encoder_hidden_states"],
                   pooled_projections=c["pooled_projections"], return_dict=False)[0]
    if family.name.startswith("pixart"):
        ts = torch.full((n,), t, device=device, dtype=torch.long)
        added = {"resolution": None, "aspect_ratio": None}
        if den.config.sample_size == 128:                  # as PixArtAlphaPipeline: the 1024 px models
            h, w = x.shape[-2] * pipe.vae_scale_factor, x.shape[-1] * pipe.vae_scale_factor
            added = {"resolution": torch.tensor([h, w], device=device, dtype=dtype).repeat(n, 1),
                     "aspect_ratio": torch.tensor([h / w], device=device, dtype=dtype).repeat(n, 1)}
        out = den(x, encoder_hidden_states=c["encoder_hidden_states"], encoder_attention_mask=c["encoder_attention_mask"],
                  timestep=ts, added_cond_kwargs=added, return_dict=False)[0]
        if den.config.out_channels // 2 == x.shape[1]:    # learned variance: keep the noise half
            out = out.chunk(2, dim=1)[0]
        return out
    if family.name == "flux":
        b, ch, h, w = x.shape
        packed = type(pipe)._pack_latents(x, b, ch, h, w)
        img_ids = type(pipe)._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        ts = torch.full((n,), float(t) / 1000, device=device, dtype=dtype)
        g = torch.full((n,), guidance, device=device, dtype=torch.float32) if den.config.guidance_embeds else None
        out = den(hidden_states=packed, timestep=ts, guidance=g, pooled_projections=c["pooled_projections"],
                  encoder_hidden_states=c["encoder_hidden_states"], txt_ids=c["txt_ids"], img_ids=img_ids,
                  return_dict=False)[0]
        return type(pipe)._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                          pipe.vae_scale_factor)
    raise ValueError(f"no denoiser pass for model family {family.name}")


def flow_sigma(t: float | int, num_train_timesteps: int = 1000) -> float:
    """A flow-matching model's interpolation weight at timestep ``t`` (its transformer sees ``t``
    or ``t / 1000``): ``sigma = t / T``."""
    return float(t) / float(num_train_timesteps)
