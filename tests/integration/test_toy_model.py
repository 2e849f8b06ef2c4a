"""The toy world's diffusion model: SD v1.4's layout, a resumable recipe, and a loadable shipped folder.

Tests on ``data/toy/model`` skip (with the command that makes it) where the folder is absent.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "toy" / "model.yaml"
SHIPPED = REPO / "data" / "toy" / "model"


def shipped() -> Path:
    if not (SHIPPED / "model_index.json").exists():
        pytest.skip(f"{SHIPPED} absent: make it with `make toy-model`")
    return SHIPPED


def attn1_grids(unet: torch.nn.Module, latent: int) -> dict[str, int]:
    """Token-grid side of every self-attention, read off the tensors a forward pass feeds them."""
    grids: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: grids.__setitem__(name, int(out.shape[1] ** 0.5)))
             for name, m in unet.named_modules() if name.endswith("attn1")]
    cross = unet.config.cross_attention_dim
    with torch.no_grad():
        unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), torch.randn(1, 77, cross))
    for h in hooks:
        h.remove()
    return grids


def tiny_config(path: Path, unet_steps: int) -> Path:
    """The shipped recipe's config at toy sizes: a handful of scenes, 2-3 optimiser steps."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"]["n_scenes"] = 12
    cfg["vae"]["arch"].update(block_out_channels=[8, 8, 8], norm_num_groups=4)
    cfg["vae"]["train"].update(steps=2, batch_size=2, ckpt_every=1)
    cfg["text_encoder"].update(hidden_size=16, intermediate_size=16, num_attention_heads=2)
    cfg["unet"]["arch"].update(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, cross_attention_dim=16)
    cfg["unet"]["train"].update(steps=unet_steps, batch_size=2, ckpt_every=1)
    cfg["samples"]["n"] = 0
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_unet_has_sd14_self_attention_layout() -> None:
    from probes.recipes.toy_model.denoiser import build_unet

    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["unet"]["arch"]["cross_attention_dim"] == cfg["text_encoder"]["hidden_size"]
    grids = attn1_grids(build_unet(cfg["unet"]["arch"], 0), cfg["unet"]["arch"]["sample_size"])
    assert len(grids) == 16
    sides = sorted(grids.values())
    assert {s: sides.count(s) for s in set(sides)} == {16: 5, 8: 5, 4: 5, 2: 1}


def test_recipe_trains_writes_checkpoint_and_resumes(tmp_path: Path) -> None:
    from probes.recipes.toy_model import recipe

    work, out = tmp_path / "work", tmp_path / "model"
    recipe.run(tiny_config(tmp_path / "a.yaml", 2), out, work, "test")
    first = torch.load(work / "unet.ckpt", weights_only=False)
    assert first["step"] == 2 and len(first["losses"]) == 2
    assert torch.load(work / "vae.ckpt", weights_only=False)["step"] == 2
    scenes_mtime = (work / "scenes.npz").stat().st_mtime_ns

    # same command, one more step: continues from the checkpoint instead of starting over
    recipe.run(tiny_config(tmp_path / "b.yaml", 3), out, work, "test")
    second = torch.load(work / "unet.ckpt", weights_only=False)
    assert second["step"] == 3 and second["losses"][:2] == first["losses"]
    assert (work / "scenes.npz").stat().st_mtime_ns == scenes_mtime   # not re-rendered

    # resuming gives the weights of an uninterrupted run (per-step seeded batches and noise)
    straight = tmp_path / "straight"
    recipe.run(tiny_config(tmp_path / "c.yaml", 3), tmp_path / "model2", straight, "test")
    third = torch.load(straight / "unet.ckpt", weights_only=False)
    assert third["losses"] == pytest.approx(second["losses"], rel=1e-5)
    for k, v in second["model"].items():
        torch.testing.assert_close(third["model"][k], v)
    assert (out / "model_index.json").exists() and (out / "MANIFEST.sha256").exists()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_recipe_stops_after_the_vae_for_the_labelers_and_continues_from_there(tmp_path: Path) -> None:
    """``make toy-model`` runs ``--until vae``, then the labelers (on the VAE) beside the rest."""
    from probes.recipes.toy_model import recipe

    work, out = tmp_path / "work", tmp_path / "model"
    config = tiny_config(tmp_path / "a.yaml", 2)
    recipe.run(config, out, work, "test", until="vae")
    assert torch.load(work / "vae.ckpt", weights_only=False)["step"] == 2      # the finished VAE
    assert not (work / "unet.ckpt").exists() and not out.exists()
    vae_mtime = (work / "vae.ckpt").stat().st_mtime_ns
    recipe.run(config, out, work, "test")
    assert (work / "vae.ckpt").stat().st_mtime_ns == vae_mtime                 # not retrained
    assert torch.load(work / "unet.ckpt", weights_only=False)["step"] == 2 and (out / "model_index.json").exists()
    with pytest.raises(ValueError, match="until='unet'"):
        recipe.run(config, out, work, "test", until="unet")


def test_unet_stage_layout_changes_speed_not_training(tmp_path: Path, monkeypatch) -> None:
    """The U-Net stage trains channels-last on its own thread count: the same losses and weights as
    the default layout (summation order aside), weights handed back contiguous (safetensors saves no
    others), and the stage's thread count set before it trains."""
    from probes.recipes.toy_model import recipe

    original, seen = recipe.denoiser.train_unet, []

    def spy(unet, *args, **kwargs):
        seen.append(torch.get_num_threads())
        trained = original(unet, *args, **kwargs)
        assert all(p.is_contiguous() for p in unet.parameters())
        return trained

    monkeypatch.setattr(recipe.denoiser, "train_unet", spy)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for name, channels_last in (("cl", True), ("plain", False)):
            cfg = yaml.safe_load(tiny_config(tmp_path / f"{name}.yaml", 3).read_text())
            cfg["unet"]["train"].update(channels_last=channels_last, threads=2)
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            recipe.run(tmp_path / f"{name}.yaml", tmp_path / f"{name}-model", tmp_path / f"{name}-work", "test")
            runs[name] = torch.load(tmp_path / f"{name}-work" / "unet.ckpt", weights_only=False)
    finally:
        torch.set_num_threads(threads)
    assert seen == [2, 2]
    assert runs["cl"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=1e-4)
    for k, v in runs["cl"]["model"].items():
        torch.testing.assert_close(v, runs["plain"]["model"][k], rtol=1e-4, atol=1e-5)


def test_recipe_refuses_a_bad_thread_count_before_any_work(tmp_path: Path) -> None:
    from probes.recipes.toy_model import recipe

    cfg = yaml.safe_load(tiny_config(tmp_path / "a.yaml", 2).read_text())
    cfg["unet"]["train"]["threads"] = 0
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"unet\.train\.threads=0"):
        recipe.run(tmp_path / "a.yaml", tmp_path / "model", tmp_path / "work", "test")
    assert not (tmp_path / "work").exists()


def test_saved_tokenizer_matches_offline_tokenizer(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from probes.recipes.toy_model.recipe import clip_tokenizer, save_tokenizer

    tok = clip_tokenizer()
    save_tokenizer(tok, tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a red sphere to the left of a blue cube", "", "a photo of a cat"]
    ids = loaded(prompts, padding="max_length", max_length=77).input_ids
    assert ids == tok(prompts, padding="max_length", max_length=77).input_ids
    assert ids[2][:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[2][-1] == 49407


def test_shipped_weights_match_manifest() -> None:
    folder = shipped()
    lines = (folder / "MANIFEST.sha256").read_text().split("\n")
    entries = dict(reversed(line.split("  ", 1)) for line in lines if line)
    weights = {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}
    assert set(entries) == weights and len(weights) == 3
    for name, digest in entries.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert sum((folder / w).stat().st_size for w in weights) < 16e6


@pytest.fixture(scope="module")
def shipped_pipe():
    from probes.diffusion.loading import DiffusionSpec, load_pipeline

    return load_pipeline(DiffusionSpec(source="hub", model_id=str(shipped()), local_files_only=True), "cpu")


def test_shipped_model_loads_like_sd(shipped_pipe) -> None:
    from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = shipped_pipe
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.safety_checker is None
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):   # fp16 on disk, upcast on load
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps) == (
        0.00085, 0.012, "scaled_linear", 1000)
    lms = LMSDiscreteScheduler.from_config(sched)            # as the project builds K-LMS
    lms.set_timesteps(15)
    assert float(lms.timesteps[0]) == 999 and float(lms.timesteps[-1]) == 0
    assert len(pipe.vae.config.block_out_channels) == 3      # 4x down-sampling: 64 px -> 16x16 latents
    sides = sorted(attn1_grids(pipe.unet, 16).values())
    assert len(sides) == 16 and set(sides) == {16, 8, 4, 2}


def test_shipped_vae_scaling_gives_unit_latents(shipped_pipe) -> None:
    from probes.diffusion.toy_vae import to_pixels
    from probes.toy.world import SHIPPED_WORLD, render_many

    rgb = render_many(48, seed=12345, size=64, fields=("rgb",), world=SHIPPED_WORLD)["rgb"]
    with torch.no_grad():
        z = shipped_pipe.vae.encode(to_pixels(rgb)).latent_dist.mean * shipped_pipe.vae.config.scaling_factor
    assert z.shape == (48, 4, 16, 16)
    assert 0.7 < float(z.std()) < 1.4


def test_shipped_folder_loads_bare_in_float32() -> None:
    """``from_pretrained(folder)`` with no options: fp16 files, every component upcast to float32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shipped(), safety_checker=None, local_files_only=True)
    assert {next(m.parameters()).dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}


def test_shipped_model_generates_with_the_protocols_sampler(shipped_pipe) -> None:
    from diffusers import LMSDiscreteScheduler

    pipe, saved = shipped_pipe, shipped_pipe.scheduler
    pipe.scheduler = LMSDiscreteScheduler.from_config(saved.config)   # as the project builds K-LMS
    try:
        images = pipe(["a red sphere", "a blue cube to the left of a green cone"], num_inference_steps=3,
                      guidance_scale=7.5, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.scheduler = saved
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert float(images.std()) > 0.01     # not a blank image
