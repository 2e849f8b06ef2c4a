"""The toy model's VAE: SD's ``AutoencoderKL`` class, trained here on the toy world's images.

Why SD's own class: the probing pipeline must treat the toy model exactly like SD v1.4 (same
``vae.decode(latents / scaling_factor)``), so only the widths differ. Three blocks give 4x
down-sampling, so 64 px images become 16x16x4 latents and the U-Net's token grids are 16/8/4/2.

Training uses random crops: the VAE is convolutional, a 32 px crop costs a quarter of a full
image and still teaches the local colour and edge structure that scenes of flat shaded objects
need; the reconstruction error is then measured on full 64 px images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from probes.common.progress import progress_bar
from probes.diffusion.toy_vae import to_pixels
from probes.recipes.toy_model.checkpoint import LoopResult, run_loop


def train_vae(vae: AutoencoderKL, rgb: np.ndarray, train: dict[str, Any], ckpt_path: Path,
              seed: int) -> LoopResult:
    """L1 reconstruction + a tiny KL (SD uses 1e-6) on random crops, resumable from ``ckpt_path``.

    No perceptual or adversarial loss: the toy world has no texture to hallucinate, and both
    would need networks we cannot download.
    """
    images = torch.from_numpy(rgb)  # uint8, converted per batch to keep memory small
    n, size = images.shape[0], images.shape[1]
    crop, batch, kl_weight = int(train["crop"]), int(train["batch_size"]), float(train["kl_weight"])
    mse_weight = float(train.get("mse_weight", 0.0))
    chroma_weight = float(train.get("chroma_weight", 0.0))

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (batch,), generator=g)
        oy, ox = (int(v) for v in torch.randint(size - crop + 1, (2,), generator=g))
        x = to_pixels(images[idx, oy:oy + crop, ox:ox + crop])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = vae.decode(z).sample
        err = recon - x
        chroma = err - err.mean(dim=1, keepdim=True)    # the error with its grey (luminance) part removed
        return (err.abs().mean() + chroma_weight * chroma.abs().mean() + mse_weight * err.pow(2).mean()
                + kl_weight * post.kl().mean())

    if not ckpt_path.exists() and "logvar_init" in train:
        # start with a narrow posterior: at the default init (std ~1) the sampling noise swamps
        # the latent and hundreds of CPU steps go into shrinking it before colours are learnt
        moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        with torch.no_grad():
            moments.bias[vae.config.latent_channels:] = float(train["logvar_init"])
    opt = torch.optim.AdamW(vae.parameters(), lr=float(train["lr"]), weight_decay=0.0)
    result, _ = run_loop("vae", ckpt_path, vae, opt, loss_fn, steps=int(train["steps"]), seed=seed,
                         lr=float(train["lr"]), warmup=int(train["warmup"]),
                         ckpt_every=int(train["ckpt_every"]), lr_floor=float(train.get("lr_floor", 0.1)))
    return result


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, rgb: np.ndarray, batch: int = 128) -> np.ndarray:
    """Posterior means of every image, unscaled, float32 [N, 4, H/4, W/4].

    Why the mean, not a sample: the cache is made once, and with SD's tiny KL weight the posterior
    std is negligible next to the diffusion noise added at every training step.
    """
    vae.eval()
    out = []
    starts = range(0, len(rgb), batch)
    for i in progress_bar(len(starts), "encode latents", iterable=starts, mininterval=5.0):
        out.append(vae.encode(to_pixels(rgb[i:i + batch])).latent_dist.mean.float().numpy())
    return np.concatenate(out)


def scaling_factor(latents: np.ndarray) -> float:
    """SD's ``scaling_factor``: 1 / std of the training latents, so the U-Net sees unit variance."""
    return float(1.0 / latents.astype(np.float64).std())


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, rgb: np.ndarray, batch: int = 64) -> float:
    """Mean absolute error in [0, 255] units on full-size images (reported in RECIPE.md)."""
    vae.eval()
    errs = []
    for i in range(0, len(rgb), batch):
        x = to_pixels(rgb[i:i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errs.append(float((recon - x).abs().mean()) * 127.5)
    return float(np.mean(errs))
