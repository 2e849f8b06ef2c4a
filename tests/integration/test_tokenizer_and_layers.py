"""Offline tokenizer, model loading (random and hub-error paths), layer registry."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import (
    DiffusionSpec,
    Precision,
    build_random_pipeline,
    load_architecture,
    load_pipeline,
    permute_weights_,
    precision_of,
)
from probes.diffusion.tokenizer import offline_clip_tokenizer

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
        DiffusionSpec(precision="fp8")
    with pytest.raises(ValueError, match="dtype.*'fp8'.*Use diffusion.precision"):
        DiffusionSpec(dtype="fp8")
    with pytest.raises(FileNotFoundError, match="shipped ones: sd14, tiny"):
        load_architecture("sd99")


def _randomised_biases(unet):
    """Random init leaves biases and norm shifts at 0 (a permutation would not show): give them values."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return unet


def test_permuted_weights_control_keeps_values_loses_structure():
    unet = _randomised_biases(build_random_pipeline("tiny").unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    done = permute_weights_(unet, seed=1)
    after = dict(unet.named_parameters())
    w = after["conv_in.weight"].detach()
    assert not torch.equal(w, before["conv_in.weight"])
    assert torch.equal(w.flatten().sort().values, before["conv_in.weight"].flatten().sort().values)
    # weights only, as the reference: every *.weight (norm layers' scales too), no bias
    assert set(done) == {n for n in before if n.endswith(".weight")} and "conv_norm_out.weight" in done
    assert all(torch.equal(after[n], before[n]) for n in before if n.endswith(".bias"))
    norm = "down_blocks.0.resnets.0.norm1.weight"
    before[norm].copy_(torch.arange(before[norm].numel(), dtype=torch.float32))   # an unpermuted copy, visible order
    unet2 = _randomised_biases(build_random_pipeline("tiny").unet)
    with torch.no_grad():
        unet2.get_parameter(norm).copy_(before[norm])
    permute_weights_(unet2, seed=1)
    assert torch.equal(dict(unet2.named_parameters())["conv_in.weight"], w)  # seeded
    assert not torch.equal(unet2.get_parameter(norm), before[norm])         # a norm's scale is permuted too


def test_permuted_control_can_permute_biases_too():
    unet = _randomised_biases(build_random_pipeline("tiny").unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    done = permute_weights_(unet, seed=1, biases=True)
    assert set(done) == set(before)
    b = unet.get_parameter("conv_in.bias")
    assert not torch.equal(b, before["conv_in.bias"])
    assert torch.equal(b.sort().values, before["conv_in.bias"].sort().values)
    weights_only = _randomised_biases(build_random_pipeline("tiny").unet)
    permute_weights_(weights_only, seed=1)
    assert torch.equal(weights_only.get_parameter("conv_in.weight"), unet.get_parameter("conv_in.weight"))
    # loaded from config: weights only by default, biases on request; each its own store
    plain = load_pipeline(DiffusionSpec(source="random", architecture="tiny"), "cpu").unet
    ctl = load_pipeline(DiffusionSpec(source="random", architecture="tiny", permute_seed=0), "cpu").unet
    ctl_b = load_pipeline(DiffusionSpec(source="random", architecture="tiny", permute_seed=0, permute_biases=True),
                          "cpu").unet
    with torch.no_grad():
        plain_b = {n: p for n, p in plain.named_parameters() if n.endswith(".bias")}
    assert all(torch.equal(p, plain_b[n]) for n, p in ctl.named_parameters() if n.endswith(".bias"))
    assert not torch.equal(ctl.conv_in.weight, plain.conv_in.weight)
    assert torch.equal(ctl.conv_in.weight, ctl_b.conv_in.weight)
    ids = [DiffusionSpec(source="random", architecture="tiny", permute_seed=0, permute_biases=b).identity()
           for b in (False, True)]
    assert ids[0] != ids[1] and ids[0]["permute"] == "weights"


def test_precision_reference_is_fp32_weights_and_latents_with_fp16_autocast_on_cuda():
    ref_cuda = Precision.resolve("reference", "cuda")
    assert (ref_cuda.weights, ref_cuda.latents, ref_cuda.autocast) == (torch.float32, torch.float32, torch.float16)
    fp16 = Precision.resolve("fp16", "cuda")
    assert (fp16.weights, fp16.latents, fp16.autocast) == (torch.float16, torch.float16, torch.float16)
    fp32 = Precision.resolve("fp32", "cuda")
    assert (fp32.weights, fp32.latents, fp32.autocast) == (torch.float32, torch.float32, None)
    for name in ("reference", "fp16", "fp32"):            # on a CPU: plain float32, no autocast
        cpu = Precision.resolve(name, "cpu")
        assert (cpu.weights, cpu.latents, cpu.autocast) == (torch.float32, torch.float32, None)
    assert Precision.resolve("bf16", "cpu").weights == torch.bfloat16
    assert DiffusionSpec().precision == "reference" and DiffusionSpec().tokenizer == "reference"
    pipe = load_pipeline(DiffusionSpec(source="random", architecture="tiny"), "cpu")
    assert precision_of(pipe) == Precision.resolve("reference", "cpu") and pipe.unet.dtype == torch.float32
    assert precision_of(pipe).autocast_context("cpu").__class__.__name__ == "nullcontext"
    bf = load_pipeline(DiffusionSpec(source="random", architecture="tiny", precision="bf16"), "cpu")
    assert bf.unet.dtype == bf.vae.dtype == torch.bfloat16 and precision_of(bf).latents == torch.bfloat16
    # precision and tokenizer are part of the store's identity (other activations, other store)
    assert DiffusionSpec(precision="fp16").identity() != DiffusionSpec().identity()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_precision_runs_fp32_weights_under_fp16_autocast_on_cuda():
    pipe = load_pipeline(DiffusionSpec(source="random", architecture="tiny"), "cuda")
    assert pipe.unet.dtype == torch.float32
    with precision_of(pipe).autocast_context("cuda"):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16


def test_old_dtype_key_reads_as_the_behaviour_it_had():
    """Configs and probe exports written before ``precision`` keep loading, with what they ran."""
    with pytest.warns(FutureWarning, match="dtype: float32 reads as precision: fp32"):
        old = DiffusionSpec(source="random", architecture="tiny", dtype="float32", permute_seed=0)
    assert (old.precision, old.tokenizer, old.permute_biases) == ("fp32", "default", True)
    assert "dtype" not in dataclasses.asdict(old)
    assert set(old.identity()) == {"model_id", "revision", "architecture_sha256", "permute_seed"}  # the old fingerprint
    with pytest.warns(FutureWarning):
        assert DiffusionSpec(dtype="auto").precision == "fp16"
    with pytest.raises(ValueError, match="disagree"):
        DiffusionSpec(dtype="float32", precision="fp16")


def test_pipeline_uses_the_configured_tokenisation():
    ref = load_pipeline(DiffusionSpec(source="random", architecture="tiny"), "cpu")       # the protocol's default
    new = load_pipeline(DiffusionSpec(source="random", architecture="tiny", tokenizer="default"), "cpu")
    assert ref.tokenizer.tokenize("what's") == ["what</w>", "'</w>", "s</w>"]
    assert new.tokenizer.tokenize("what's") == ["what</w>", "'s</w>"]
    a = ref.encode_prompt("what's this", "cpu", 1, False)[0]
    b = new.encode_prompt("what's this", "cpu", 1, False)[0]
    assert a.shape == b.shape and not a.equal(b)
    with pytest.raises(ValueError, match="'slow'"):
        DiffusionSpec(tokenizer="slow")
