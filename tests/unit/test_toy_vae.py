"""VAE round trips of renders: the three places a toy VAE lives load to the same network."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from probes.diffusion import toy_vae
from probes.diffusion.toy_vae import build_vae
from probes.paths import data_path
from probes.toy.world import render_many

ARCH = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4, "sample_size": 16}


def test_checkpoint_and_folder_give_the_same_reconstructions(tmp_path):
    vae = build_vae(ARCH, seed=5).eval()
    torch.save({"model": vae.state_dict(), "step": 7}, tmp_path / "vae.ckpt")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"vae": {"arch": ARCH}}))
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    rgb = render_many(3, seed=11, size=16, fields=("rgb",))["rgb"]
    from_ckpt = toy_vae.reconstruct(toy_vae.load_vae(tmp_path / "vae.ckpt", tmp_path / "model.yaml"), rgb)
    from_pipe = toy_vae.reconstruct(toy_vae.load_vae(tmp_path / "pipe"), rgb)
    from_vae = toy_vae.reconstruct(toy_vae.load_vae(tmp_path / "pipe" / "vae"), rgb)
    assert from_ckpt.shape == rgb.shape and from_ckpt.dtype == np.uint8
    assert np.abs(from_ckpt.astype(int) - from_pipe.astype(int)).max() <= 1
    assert (from_pipe == from_vae).all()
    assert toy_vae.checkpoint_step(tmp_path / "vae.ckpt") == 7
    assert toy_vae.checkpoint_step(tmp_path / "pipe") is None


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.ckpt"):
        toy_vae.load_vae(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        toy_vae.load_vae(tmp_path)
    vae = build_vae(ARCH, seed=5).eval()
    with pytest.raises(ValueError, match="uint8"):
        toy_vae.reconstruct(vae, np.zeros((1, 16, 16, 3), np.float32))


def test_shipped_vae_reconstructs_renders_closely():
    shipped = data_path("toy", "model")
    if not (shipped / "vae" / "config.json").exists():
        pytest.skip("no shipped toy model")
    rgb = render_many(4, seed=31, fields=("rgb",))["rgb"]
    out = toy_vae.reconstruct(toy_vae.load_vae(shipped), rgb)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(float) - rgb).mean() < 12.0       # of 255; the recipe reports ~3-4
