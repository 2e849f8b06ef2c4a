"""Offline tokenizer, model loading (random and hub-error paths), layer registry."""
from __future__ import annotations

import pytest
import torch

from probes.models.layers import LayerRegistry
from probes.models.loading import (
    DiffusionSpec,
    build_random_pipeline,
    load_architecture,
    load_pipeline,
    permute_weights_,
)
from probes.models.tokenizer import offline_clip_tokenizer

SD14_LAYERS = ["down0.0", "down0.1", "down1.0", "down1.1", "down2.0", "down2.1", "mid.0",
               "up1.0", "up1.1", "up1.2", "up2.0", "up2.1", "up2.2", "up3.0", "up3.1", "up3.2"]


def test_clip_tokenizer_offline_matches_clip():
    tok = offline_clip_tokenizer()
    assert len(tok) == 49408
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD v1 pads with <|endoftext|>


def test_tiny_keeps_sd14_topology(tiny_pipe):
    reg = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16))
    assert reg.names() == SD14_LAYERS
    grids = {n: reg.get(n).grid for n in reg.names()}
    assert grids["down0.0"] == (16, 16) and grids["down1.0"] == (8, 8) and grids["down2.1"] == (4, 4)
    assert grids["mid.0"] == (2, 2) and grids["up1.2"] == (4, 4) and grids["up3.2"] == (16, 16)
    assert reg.get("up3.0").module == "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert sum(p.numel() for p in tiny_pipe.unet.parameters()) < 3_000_000


def test_sd14_architecture_and_registry():
    """SD v1.4's real architecture, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    arch = load_architecture("sd14")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    reg = LayerRegistry.from_unet(unet, (64, 64))
    assert reg.names() == SD14_LAYERS
    expect = {"down0": ((64, 64), 320), "down1": ((32, 32), 640), "down2": ((16, 16), 1280), "mid": ((8, 8), 1280),
              "up1": ((16, 16), 1280), "up2": ((32, 32), 640), "up3": ((64, 64), 320)}
    for layer in reg:
        assert (layer.grid, layer.channels) == expect[layer.name.split(".")[0]], layer.name


def test_registry_selection_and_errors(tiny_pipe):
    reg = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16))
    assert [l.name for l in reg.select(["up3*"])] == ["up3.0", "up3.1", "up3.2"]
    assert [l.name for l in reg.select("all")] == SD14_LAYERS
    assert [l.name for l in reg.select(["mid.0", "down0.0"])] == ["down0.0", "mid.0"]  # forward order
    assert reg.list("up_blocks.1.*") == ["up1.0", "up1.1", "up1.2"]
    with pytest.raises(KeyError, match="valid layers: down0.0, down0.1"):
        reg.select(["up9.9"])
    with pytest.raises(KeyError, match="unknown layer 'nope'"):
        reg.get("nope")


def test_random_weights_are_seeded():
    a = build_random_pipeline("tiny", init_seed=3).unet.conv_in.weight
    b = build_random_pipeline("tiny", init_seed=3).unet.conv_in.weight
    c = build_random_pipeline("tiny", init_seed=4).unet.conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hub_loading_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = DiffusionSpec(source="hub", model_id="CompVis/stable-diffusion-v1-4", revision="abc123",
                         cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        load_pipeline(spec, "cpu")
    msg = str(err.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and str(tmp_path) in msg
    assert "download CompVis/stable-diffusion-v1-4 --revision abc123" in msg


def test_bad_spec_values_are_named():
    with pytest.raises(ValueError, match="'hf'"):
        DiffusionSpec(source="hf")
    with pytest.raises(ValueError, match="'fp8'"):
        DiffusionSpec(dtype="fp8")
    with pytest.raises(FileNotFoundError, match="shipped ones: sd14, tiny"):
        load_architecture("sd99")


def test_permuted_weights_control_keeps_values_loses_structure():
    unet = build_random_pipeline("tiny").unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    permute_weights_(unet, seed=1)
    w = dict(unet.named_parameters())["conv_in.weight"].detach()
    assert not torch.equal(w, before["conv_in.weight"])
    assert torch.equal(w.flatten().sort().values, before["conv_in.weight"].flatten().sort().values)
    unet2 = build_random_pipeline("tiny").unet
    permute_weights_(unet2, seed=1)
    assert torch.equal(dict(unet2.named_parameters())["conv_in.weight"], w)  # seeded
