"""The toy model's VAE: built, loaded from any of the places it lives, and round trips of renders.

Why here (the diffusion model's package) and not in the recipe: the VAE is trained by
:mod:`probes.recipes.toy_model` but used by the toy labelers' recipe as well (VAE round trips of
their training renders, and their scores on reconstructions), and recipes never import each
other; both import this.

Why round trips: the labelers are trained on exact renders but label images the diffusion model
decodes, which the 4x VAE has softened. Encoding a held-out render and decoding its posterior
mean gives an image with the VAE's blur and colour errors whose labels are still the scene's
exact ones, so the labelers' error on decoded images can be measured instead of assumed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from probes.common.files import read_checkpoint
from probes.paths import REPO_ROOT

#: the toy model's recipe config, whose ``vae.arch`` rebuilds a training checkpoint's network
DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy" / "model.yaml"


def build_vae(arch: dict[str, Any], seed: int) -> AutoencoderKL:
    """A seeded ``AutoencoderKL`` from the config's architecture section."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**arch)


def to_pixels(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], SD's pixel convention."""
    x = torch.as_tensor(np.asarray(rgb))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _folder(path: Path) -> Path:
    return path / "vae" if (path / "vae" / "config.json").exists() else path


def load_vae(path: Path, config: Path = DEFAULT_CONFIG) -> AutoencoderKL:
    """The toy ``AutoencoderKL`` in float32 eval mode, from any of the three places it lives.

    ``path`` is a diffusers pipeline folder (its ``vae/``), a VAE folder (``config.json`` plus
    weights), or the recipe's training checkpoint ``<work>/vae.ckpt`` (then ``config``'s
    ``vae.arch`` rebuilds the network: the checkpoint holds only weights), so the labelers can be
    scored on reconstructions as soon as the recipe's VAE stage is done, before the U-Net is.
    """
    path = Path(path)
    if path.is_dir():
        folder = _folder(path)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{path} holds no VAE (no config.json in it or in {path / 'vae'}); "
                                    "pass a pipeline folder, its vae/ folder, or the recipe's vae.ckpt")
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        return vae.float().eval()
    if not path.exists():
        raise FileNotFoundError(f"no VAE at {path}; pass a pipeline folder, its vae/ folder, or the "
                                "recipe's <work>/vae.ckpt (written during the recipe's VAE stage)")
    import yaml

    arch = yaml.safe_load(Path(config).read_text())["vae"]["arch"]
    state = read_checkpoint(path)
    vae = build_vae(arch, seed=0)
    vae.load_state_dict(state["model"])
    return vae.float().eval()


def weights_file(path: Path) -> Path:
    """The file holding the VAE's weights (for its sha256 in a recipe)."""
    path = Path(path)
    if path.is_dir():
        folder = _folder(path)
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no VAE weights in {folder}")
        return files[0]
    return path


def checkpoint_step(path: Path) -> int | None:
    """The optimiser step a recipe checkpoint was written at (None for a folder)."""
    path = Path(path)
    if path.is_dir():
        return None
    return int(read_checkpoint(path)["step"])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, rgb: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC: decode(posterior mean of encode(x)), rounded as a sampler's output is."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {rgb.dtype} {rgb.shape}")
    out = []
    for i in range(0, len(rgb), batch):
        x = to_pixels(rgb[i:i + batch])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros_like(rgb)
