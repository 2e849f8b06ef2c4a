"""The toy model's text encoder and U-Net: SD v1.4's classes and topology, trained on latents.

Why these choices (measured on the shared 2-core machine, see RECIPE.md):
- the U-Net keeps SD v1.4's blocks (three ``CrossAttnDownBlock2D`` + ``DownBlock2D``, ``UpBlock2D``
  + three ``CrossAttnUpBlock2D``, two layers per block), so it has SD's 16 ``attn1`` layers, on
  16/8/4/2 token grids;
- the CLIP text encoder stays frozen at its seeded random init: its outputs still carry each
  token's identity and position, every caption's embedding is computed once, and a U-Net step
  then costs no text-encoder work at all;
- epsilon prediction on SD's noise schedule, with Min-SNR loss weighting (Hang et al. 2023), which
  reaches a given quality in several times fewer steps without changing what the model predicts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from probes.recipes.toy_model.checkpoint import EMA, LoopResult, run_loop


def build_text_encoder(arch: dict[str, Any], seed: int) -> CLIPTextModel:
    """A seeded random ``CLIPTextModel`` with CLIP's special-token ids (the real tokenizer's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**arch))
    return model.eval().requires_grad_(False)


def build_unet(arch: dict[str, Any], seed: int) -> UNet2DConditionModel:
    """A seeded ``UNet2DConditionModel`` from the config's architecture section."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**arch)


def train_noise_scheduler(cfg: dict[str, Any]) -> DDPMScheduler:
    """SD's training noise schedule (the sampling scheduler saved with the model shares its betas)."""
    keep = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")
    return DDPMScheduler.from_config({k: cfg[k] for k in keep} | {"prediction_type": "epsilon",
                                                                  "clip_sample": False})


@torch.no_grad()
def embed_captions(text_encoder: CLIPTextModel, tokenizer: Any, captions: list[str],
                   batch: int = 256) -> torch.Tensor:
    """``last_hidden_state`` of each caption, padded to 77 tokens exactly as SD's pipeline does."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i:i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0].float())
    return torch.cat(out)


def caption_table(captions: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct captions (the empty prompt first, for classifier-free guidance) and each scene's index."""
    distinct = [""] + sorted(set(captions) - {""})
    index = {c: i for i, c in enumerate(distinct)}
    return distinct, np.array([index[c] for c in captions], dtype=np.int64)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: ``min(SNR, gamma) / SNR``."""
    alphas = scheduler.alphas_cumprod[timesteps].float()
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / snr


def train_unet(unet: UNet2DConditionModel, latents: np.ndarray, caption_index: np.ndarray,
               caption_embeds: torch.Tensor, train: dict[str, Any], scheduler_cfg: dict[str, Any],
               ckpt_path: Path, seed: int) -> tuple[LoopResult, EMA | None]:
    """Denoising training on scaled latents with caption dropout, resumable from ``ckpt_path``.

    ``latents`` are already multiplied by the VAE's ``scaling_factor``. Row 0 of
    ``caption_embeds`` is the empty prompt: a dropped caption becomes it, so the model also learns
    the unconditional prediction that guidance 7.5 extrapolates from.
    """
    x_all = torch.from_numpy(latents).float()
    if train.get("channels_last", False):
        # oneDNN's convolutions run channels-last natively: 1.27x per step on one thread here
        # (BENCHMARKS.md); the arithmetic is the same up to summation order
        unet.to(memory_format=torch.channels_last)
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    cap_all = torch.from_numpy(caption_index)
    scheduler = train_noise_scheduler(scheduler_cfg)
    n, batch = x_all.shape[0], int(train["batch_size"])
    drop_p, gamma = float(train["caption_dropout"]), float(train["snr_gamma"])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch,), generator=g)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        caps = cap_all[idx].masked_fill(torch.rand(batch, generator=g) < drop_p, 0)
        pred = unet(scheduler.add_noise(x0, noise, t), t, caption_embeds[caps]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(scheduler, t, gamma)).mean()

    opt = torch.optim.AdamW(unet.parameters(), lr=float(train["lr"]),
                            weight_decay=float(train.get("weight_decay", 0.0)))
    result = run_loop("unet", ckpt_path, unet, opt, loss_fn, steps=int(train["steps"]), seed=seed,
                      lr=float(train["lr"]), warmup=int(train["warmup"]),
                      ckpt_every=int(train["ckpt_every"]), lr_floor=float(train.get("lr_floor", 0.1)),
                      ema_decay=train.get("ema_decay"))
    unet.to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors only
    return result
