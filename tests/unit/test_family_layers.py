"""Readout rules, the installed diffusers' tuple orders, layer names and grids of every family."""
from __future__ import annotations

import pytest
import torch

from probes.diffusion.families.layers import check_patterns, denoiser_registry, transformer_registry
from probes.diffusion.families.sizes import bytes_per_image, meta_denoiser, real_registry
from probes.diffusion.families.spec import FAMILIES, family_of_pipeline_class, get_family
from probes.diffusion.families.tiny import list_tiny, t5_vocabulary, tiny_architecture, tiny_t5_tokenizer
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import DiffusionSpec
from probes.diffusion.readout import READOUTS, read_tokens, tokens_to_grid, write_tokens

LAYER = LayerInfo("joint0", "transformer_blocks.0", channels=8, grid=(2, 3), readout="second")   # 6 image tokens


def tiny_denoiser(family: str) -> torch.nn.Module:
    import diffusers

    arch = tiny_architecture(family)
    name = "unet" if "unet" in arch["components"] else "transformer"
    spec = arch["components"][name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(diffusers, spec["class"])(**spec["config"])


# -- readout rules -----------------------------------------------------------------------------
def test_tokens_rule_passes_tokens_and_refuses_other_shapes():
    x = torch.randn(2, 6, 8)
    assert read_tokens(LayerInfo("block0", "m", 8, (2, 3), "tokens"), x) is x
    with pytest.raises(RuntimeError, match=r"shape \(2, 6, 8\); expected \[batch, 9, 8\]"):
        read_tokens(LayerInfo("block0", "m", 8, (3, 3), "tokens"), x)
    with pytest.raises(RuntimeError, match="not one tensor"):
        read_tokens(LayerInfo("block0", "m", 8, (2, 3), "tokens"), (x, x))


def test_pair_rules_pick_the_image_item_and_catch_a_swapped_order():
    text, image = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    assert read_tokens(LayerInfo("joint0", "m", 8, (2, 3), "second"), (text, image)) is image
    assert read_tokens(LayerInfo("joint0", "m", 8, (2, 3), "second"), (None, image)) is image   # SD3's last block
    assert read_tokens(LayerInfo("joint0.attn", "m", 8, (2, 3), "first"), (image, text)) is image
    with pytest.raises(RuntimeError, match="are item 0, not 1"):
        read_tokens(LayerInfo("joint0", "m", 8, (2, 3), "second"), (image, text))


def test_after_text_reads_a_pair_or_the_tail_of_one_stream():
    text, image = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    layer = LayerInfo("single0", "m", 8, (2, 3), "after_text")
    assert read_tokens(layer, (text, image)) is image
    assert torch.equal(read_tokens(layer, torch.cat([text, image], 1)), image)
    with pytest.raises(RuntimeError, match="text then 6 image tokens"):
        read_tokens(layer, torch.randn(2, 4, 8))


def test_channels_first_is_row_major_tokens():
    fmap = torch.arange(2 * 8 * 2 * 3, dtype=torch.float32).reshape(2, 8, 2, 3)
    tokens = read_tokens(LayerInfo("down0.res0", "m", 8, (2, 3), "channels_first"), fmap)
    assert torch.equal(tokens_to_grid(tokens, (2, 3)).permute(0, 3, 1, 2), fmap)


def test_layer_round_trips_through_its_dict_and_rejects_unknown_rules():
    assert LayerInfo.from_dict(LAYER.to_dict()) == LAYER and LAYER.to_dict()["readout"] == "second"
    unet_layer = LayerInfo("down0.0", "x", 8, (2, 3))
    assert unet_layer.to_dict() == {"name": "down0.0", "module": "x", "channels": 8, "grid": [2, 3]}   # as before
    assert LayerInfo.from_dict(unet_layer.to_dict()).readout == "tokens"
    with pytest.raises(ValueError, match="unknown readout rule 'third'"):
        LayerInfo("joint0", "m", 8, (2, 3), "third")
    assert set(READOUTS) == {"tokens", "first", "second", "after_text", "channels_first"}
    assert [LayerInfo(n, "m", 8, (2, 3)).kind for n in ("joint3", "single0.attn", "block12", "down0.1")] == \
        ["block", "attn", "block", "attn1"]


@pytest.mark.parametrize("rule,out", [
    ("tokens", lambda t, i: i),
    ("second", lambda t, i: (t, i)),
    ("second", lambda t, i: (None, i)),                 # SD3's last block has no text stream
    ("first", lambda t, i: (i, t)),
    ("after_text", lambda t, i: (t, i)),
    ("after_text", lambda t, i: torch.cat([t, i], 1)),  # older diffusers: one stream, text first
    ("channels_first", lambda t, i: i.transpose(1, 2).reshape(2, 8, 2, 3)),
])
def test_writing_image_tokens_is_the_inverse_of_reading_them(rule, out):
    """What the intervention needs: the edited tokens come back from the rule, the text stays."""
    text, image = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    layer, new = LayerInfo("x0", "m", 8, (2, 3), rule), torch.randn(2, 6, 8)
    original = out(text, image)
    torch.testing.assert_close(read_tokens(layer, original), image, rtol=0, atol=0)
    written = write_tokens(layer, original, new)
    torch.testing.assert_close(read_tokens(layer, written), new, rtol=0, atol=0)
    if isinstance(original, tuple) and original[0] is not None and rule != "first":
        assert written[0] is original[0]                     # the text stream is the module's own
    if rule == "after_text" and not isinstance(original, tuple):
        assert torch.equal(written[:, :5], text)


# -- the installed diffusers' output orders ----------------------------------------------------------
def test_installed_block_and_attention_output_orders():
    """Text and image token counts differ, so shapes tell the items apart: blocks return
    (text, image), joint attention modules (image, text); the rules follow (see readout.py)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    g = torch.Generator().manual_seed(0)
    img, txt, temb = (torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 16, generator=g),
                      torch.randn(1, 16, generator=g))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        joint = JointTransformerBlock(16, 2, 8)
        out = joint(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        assert [o.shape[1] for o in out] == [5, 6]
        attn = joint.attn(hidden_states=img, encoder_hidden_states=txt)
        assert [o.shape[1] for o in attn] == [6, 5]
        last = JointTransformerBlock(16, 2, 8, context_pre_only=True)(hidden_states=img, encoder_hidden_states=txt,
                                                                      temb=temb)
        assert last[0] is None and last[1].shape[1] == 6
        flux = FluxTransformerBlock(16, 2, 8)
        assert [o.shape[1] for o in flux(hidden_states=img, encoder_hidden_states=txt, temb=temb)] == [5, 6]
        assert [o.shape[1] for o in flux.attn(hidden_states=img, encoder_hidden_states=txt)] == [6, 5]
        single = FluxSingleTransformerBlock(16, 2, 8)
        out = single(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        assert isinstance(out, tuple) and [o.shape[1] for o in out] == [5, 6]
        assert single.attn(hidden_states=torch.cat([txt, img], 1)).shape[1] == 11


# -- names, grids, patterns ------------------------------------------------------------------------
@pytest.mark.parametrize("family,names", [
    ("sd3", ["joint0", "joint1", "joint2"]),
    ("pixart_alpha", ["block0", "block1", "block2"]),
    ("flux", ["joint0", "joint1", "single0", "single1"]),
])
def test_transformer_names_modules_and_grids(family, names):
    reg = denoiser_registry(family, tiny_denoiser(family), (16, 16))
    assert reg.names() == names
    assert all(info.grid == (8, 8) and info.channels == 32 and info.kind == "block" for info in reg)
    den = tiny_denoiser(family)
    for info in reg:
        den.get_submodule(info.module)            # every module path exists
    full = denoiser_registry(family, den, (16, 16), kinds=("block", "attn"))
    assert full.names()[:2] == [names[0], names[0] + ".attn"] and full.get(names[0] + ".attn").kind == "attn"
    for info in full:
        den.get_submodule(info.module)


def test_unet_families_keep_todays_names_with_sdxl_depth_suffixes():
    sd2 = denoiser_registry("sd2", tiny_denoiser("sd2"), (16, 16))
    assert sd2.names()[:3] == ["down0.0", "down0.1", "down1.0"] and len(sd2) == 16
    assert sd2.get("down0.0").grid == (16, 16) and sd2.get("mid.0").grid == (2, 2)
    sdxl = denoiser_registry("sdxl", tiny_denoiser("sdxl"), (16, 16))
    assert sdxl.names() == ["down1.0", "down1.1", "down2.0.0", "down2.0.1", "down2.1.0", "down2.1.1", "mid.0.0",
                            "mid.0.1", "up0.0.0", "up0.0.1", "up0.1.0", "up0.1.1", "up0.2.0", "up0.2.1", "up1.0",
                            "up1.1", "up1.2"]
    assert all(info.readout == "tokens" for info in sdxl)


def test_patterns_select_and_unknown_names_list_the_valid_ones():
    reg = denoiser_registry("flux", tiny_denoiser("flux"), (16, 16))
    assert reg.list("single*") == ["single0", "single1"]
    assert [i.name for i in reg.select(["joint1", "single_transformer_blocks.0"])] == ["joint1", "single0"]
    with pytest.raises(KeyError, match="model family flux; valid layers: joint0, joint1, single0, single1"):
        reg.select("joint7")
    with pytest.raises(KeyError, match="unknown layer 'block0' for model family flux"):
        reg.get("block0")
    check_patterns("flux", ["joint*", "single12", "transformer_blocks.3*"])
    with pytest.raises(ValueError, match="'jiont3' names no layer of model family flux.*joint<i>, single<i>"):
        check_patterns("flux", "jiont3")
    with pytest.raises(ValueError, match="'single3' names no layer of model family sd3"):
        check_patterns("sd3", "single3")
    with pytest.raises(ValueError, match="upp3.0"):
        check_patterns("sdxl", "upp3.0")


def test_misspelt_family_fails_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown model family 'fluxx'; valid families: sd1, sd2, sdxl"):
        get_family("fluxx")
    with pytest.raises(ValueError, match="fluxx"):
        tiny_architecture("fluxx")
    with pytest.raises(ValueError, match="diffusion.family: unknown model family 'fluxx'; valid families: sd1, sd2"):
        DiffusionSpec(model_id="black-forest-labs/FLUX.1-schnell", family="fluxx", tokenizer="default")
    with pytest.raises(ValueError, match="architecture='tiny_sd3' is a sd3 architecture"):
        DiffusionSpec(source="random", architecture="tiny_sd3", family="flux", tokenizer="default")
    with pytest.raises(ValueError, match="no CLIP tokenizer: set diffusion.tokenizer=default"):
        DiffusionSpec(source="random", architecture="tiny_pixart_alpha")
    assert set(list_tiny()) == set(FAMILIES)


def test_family_of_a_spec_and_the_identity_of_sd1_stores():
    """SD v1.x configs name no family and their stores' identity is what it was (no ``family`` key);
    other families' stores name theirs."""
    assert DiffusionSpec().family_name == "sd1" and "family" not in DiffusionSpec().identity()
    assert DiffusionSpec(source="random", architecture="tiny").family_name == "sd1"
    flux = DiffusionSpec(model_id="black-forest-labs/FLUX.1-schnell", tokenizer="default")
    assert flux.family_name == "flux" and flux.identity()["family"] == "flux"      # a Hub id the table names
    assert DiffusionSpec(source="random", architecture="tiny_sd3", tokenizer="default").identity()["family"] == "sd3"


def test_family_of_pipeline_class():
    assert family_of_pipeline_class("StableDiffusionPipeline", {"use_linear_projection": True}).name == "sd2"
    assert family_of_pipeline_class("StableDiffusionPipeline", {}).name == "sd1"
    assert family_of_pipeline_class("FluxPipeline").name == "flux"
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        family_of_pipeline_class("KandinskyPipeline")


def test_cfg_layouts():
    assert get_family("sd3").cfg_layout(5.0) == "batched" and get_family("sd3").cfg_layout(1.0) == "none"
    flux = get_family("flux")
    assert flux.cfg_layout(3.5) == "none"                      # distilled guidance: one pass
    assert flux.cfg_layout(3.5, true_cfg_scale=2.0) == "sequential"
    assert flux.cfg_layout(3.5, true_cfg_scale=2.0, negative_prompt=False) == "none"


def test_odd_latent_grids_are_refused():
    with pytest.raises(ValueError, match="multiples of 2"):
        transformer_registry(get_family("sd3"), tiny_denoiser("sd3"), (15, 16))


# -- tokens sit on the latent grid / patch, row-major -----------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "pixart_alpha", "flux"])
def test_token_k_is_latent_patch_row_k_div_w_col_k_mod_w(family):
    """Change one 2x2 patch of the latent: exactly the token at (row, col) of the registry's grid changes."""
    from diffusers import FluxPipeline

    den = tiny_denoiser(family)
    channels = den.config.in_channels // (4 if family == "flux" else 1)
    grid = denoiser_registry(family, den, (16, 12)).get("joint0" if family != "pixart_alpha" else "block0").grid
    assert grid == (8, 6)
    lat = torch.randn(1, channels, 16, 12, generator=torch.Generator().manual_seed(0))
    moved = lat.clone()
    moved[:, :, 2 * 5:2 * 5 + 2, 2 * 3:2 * 3 + 2] += 1.0          # patch (5, 3)

    def embed(x):
        if family == "flux":
            return den.x_embedder(FluxPipeline._pack_latents(x, 1, channels, 16, 12))
        return den.pos_embed(x)

    with torch.no_grad():
        changed = (embed(moved) - embed(lat)).abs().amax(-1)[0]
    assert changed.shape == (8 * 6,)
    assert torch.nonzero(changed > 0).flatten().tolist() == [5 * 6 + 3]


# -- tokenizers and sizes --------------------------------------------------------------------------
def test_tiny_t5_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_t5_tokenizer()
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.unk_token_id not in ids
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a photo of a cat").input_ids == ids and len(again) == len(t5_vocabulary())


def test_bytes_per_image_is_tokens_times_channels_times_steps_halves_and_width():
    layers = [LayerInfo("a", "m", 3, (2, 2)), LayerInfo("b", "m", 5, (1, 1))]
    assert bytes_per_image(layers, steps=4, halves=2) == (4 * 3 + 1 * 5) * 4 * 2 * 2


def test_real_model_layer_counts_from_their_configs():
    """The registries of the real models built on the meta device, at native resolution."""
    flux = real_registry("black-forest-labs/FLUX.1-schnell")
    assert len(flux.list("joint*")) == 19 and len(flux.list("single*")) == 38
    assert {(i.grid, i.channels) for i in flux} == {((64, 64), 3072)}
    sdxl = real_registry("stabilityai/stable-diffusion-xl-base-1.0")
    assert len(sdxl) == 70 and sdxl.get("down1.0.0").grid == (64, 64) and sdxl.get("mid.0.9").channels == 1280
    sd3 = real_registry("stabilityai/stable-diffusion-3.5-medium")
    assert len(sd3) == 24 and {(i.grid, i.channels) for i in sd3} == {((64, 64), 1536)}
    pixart = real_registry("PixArt-alpha/PixArt-XL-2-512x512")
    assert len(pixart) == 28 and {(i.grid, i.channels) for i in pixart} == {((32, 32), 1152)}
    sd21 = real_registry("stabilityai/stable-diffusion-2-1")
    assert len(sd21) == 16 and sd21.get("down0.0").grid == (96, 96) and sd21.get("mid.0").channels == 1280
    assert meta_denoiser("FluxTransformer2DModel", {"num_layers": 1, "num_single_layers": 1}).x_embedder.weight.is_meta


def test_cli_lists_layers_and_sizes(capsys):
    """``diffusion-probes layers`` / ``sizes`` through the one CLI convention (configs only, no weights)."""
    from probes.cli.main import main

    main(["layers", "--model", "tiny_flux", "--pattern", "single*", "--kinds", "block,attn"])
    out = capsys.readouterr().out.splitlines()
    assert "tiny_flux (model family flux) at 256x256" in out[0]          # FLUX's native: 128 latent px x 2
    assert [line.split()[0] for line in out[1:-1]] == ["single0", "single0.attn", "single1", "single1.attn"]
    assert "64x64" in out[1] and "after_text" in out[1] and "single_transformer_blocks.0" in out[1]
    main(["layers", "--model", "tiny_flux", "--size", "32", "--pattern", "joint0"])
    assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["joint0", "block", "32", "ch", "8x8"]
    main(["layers", "--model", "black-forest-labs/FLUX.1-schnell", "--pattern", "joint18"])
    assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["joint18", "block", "3072", "ch", "64x64"]
    main(["layers", "--model", "sd3"])                                   # a family: its real model
    out = capsys.readouterr().out.splitlines()
    assert "stable-diffusion-3.5-medium (model family sd3) at 1024x1024: 24 of 24 layers" in out[0]
    main(["layers", "--model", "sd1", "--pattern", "up3*"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]] == ["up3.0", "up3.1", "up3.2"]
    with pytest.raises(SystemExit, match="'jiont3' matches no layer of model family flux; valid layers: joint0"):
        main(["layers", "--model", "flux", "--pattern", "jiont3"])
    main(["sizes"])
    out = capsys.readouterr().out
    assert "black-forest-labs/FLUX.1-schnell" in out and "1.4 GB" in out     # 57 x 4096 x 3072 x 2 bytes per step
