"""The semantic lens and the intervention on diffusion transformers (tiny random SD3, PixArt, FLUX).

The lens reads a transformer block's *image* tokens through its readout rule (not its text stream)
as feature maps on the token grid, noises flow-matching latents along their straight line, and runs
``diffusion-probes lens`` end to end on PixArt. The intervention's editor writes the edited image
tokens back into the block's output with the rule's inverse (the text stream untouched): SD3's
joint blocks through ``diffusion-probes intervene``, FLUX's single-stream blocks (text tokens
first) directly, zero iterations leaving every image bit-identical.
"""
from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from probes.cli.main import main
from probes.contract import ProbeSpec
from probes.diffusion.families.layers import registry_for
from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.diffusion.readout import read_tokens, tokens_to_grid
from probes.experiments.intervention.editor import ActivationEditor, EditSettings
from probes.experiments.intervention.pipeline import sample_images
from probes.experiments.lens.features import FeatureExtractor, FeatureSpec
from probes.export.probeset import export_probes
from probes.generation.sampling import CaptureSpec, GenerationSpec, sampler_timesteps
from probes.paths import REPO_ROOT
from probes.prompts.sets import PromptRecord, PromptSpec
from probes.training.module import ProbeModule


def tiny(family: str):
    spec = DiffusionSpec(source="random", architecture=f"tiny_{family}", precision="fp32", tokenizer="default")
    return spec, load_pipeline(spec)


def toy_images(n: int, size: int = 32) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [g.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# -- the lens --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "pixart_alpha", "flux"])
def test_lens_features_are_the_blocks_image_tokens_on_the_token_grid(family):
    """Each layer's feature map is its module's output read by the layer's rule, on the 8x8 token grid
    of a 32 px image; the denoising steps (flow matching for SD3 and FLUX) run before the pass."""
    _, pipe = tiny(family)
    ext = FeatureExtractor(pipe, FeatureSpec(layers=["all"], timestep=300, denoise_steps=1, denoise_from=600,
                                             image_size=32, batch_size=2))
    names = [layer.name for layer in ext.layers]
    assert any(n.endswith(".attn") for n in names) and all(layer.grid == (8, 8) for layer in ext.layers)
    seen: dict[str, torch.Tensor] = {}
    handles = [ext.denoiser.get_submodule(layer.module).register_forward_hook(
        lambda m, a, out, _l=layer: seen.__setitem__(_l.name, read_tokens(_l, out).detach().clone()))
        for layer in ext.layers]
    try:
        feats = ext.extract(toy_images(2), ["a", "b"])
    finally:
        for h in handles:
            h.remove()
    for layer in ext.layers:                  # the last call of each hook is the feature pass
        expected = tokens_to_grid(seen[layer.name], layer.grid).permute(0, 3, 1, 2)
        assert feats[layer.name].shape == (2, layer.channels, 8, 8)
        torch.testing.assert_close(feats[layer.name], expected.float(), rtol=1e-5, atol=1e-6)
    if family in ("sd3", "flux"):             # flow matching: x_t = (1 - t/1000) x0 + t/1000 noise
        x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        torch.testing.assert_close(ext.noised(x0, noise, 250), 0.75 * x0 + 0.25 * noise)
        eps, x0_hat = ext._eps_and_x0(noise - x0, ext.noised(x0, noise, 250), 250)    # the exact velocity
        torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eps, noise, rtol=1e-5, atol=1e-6)


def test_lens_command_runs_on_a_transformer_family(tmp_path):
    """``diffusion-probes lens`` on tiny PixArt (the semantic experiment and the denoising-step sweep,
    model and permuted control): its block names at parse time, report and metrics."""
    cfg = {"defaults": [str(REPO_ROOT / "configs" / "lens" / "tiny.yaml")],
           "diffusion": {"source": "random", "architecture": "tiny_pixart_alpha", "tokenizer": "default",
                         "local_files_only": True},
           "data": {"n": 8}, "video": {"n": 2, "frames": 3},
           "features": {"layers": ["block0", "block1.attn", "block2"], "batch_size": 8},
           "experiments": {"run": ["semantic", "steps"], "timesteps": [0, 100], "denoise_steps": [0, 1], "sweep_top": 1,
                           "tsne_layers": 1, "auto_combinations": 0, "combinations": []}}
    path = tmp_path / "lens.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["lens", "--config", str(path), "--out", str(tmp_path / "run"), "--cache_root", str(tmp_path / "cache"),
          "--progress", "false"])
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"block0", "block1.attn", "block2"} <= {r["layers"] for r in rows}
    assert {r["model"] for r in rows} == {"tiny random", "permuted control"}      # the control: a permuted transformer
    assert (tmp_path / "run" / "report.md").is_file()
    cfg["features"]["layers"] = ["down0.res0"]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="features.layers: 'down0.res0' names no layer of model family pixart_alpha"):
        main(["lens", "--config", str(path), "--out", str(tmp_path / "bad"), "--cache_root", str(tmp_path / "cache")])


# -- the intervention --------------------------------------------------------------------------------
STEPS = 3


@pytest.fixture(scope="module")
def sd3_export(tmp_path_factory) -> Path:
    """Random probes for every block and step of tiny SD3, with a real recorded data config."""
    tmp = tmp_path_factory.mktemp("sd3_intervention")
    diffusion, pipe = tiny("sd3")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object {i}" for i in range(6)) + "\n")
    generation = GenerationSpec(steps=STEPS, batch_size=2, height=32, width=32, scheduler="native",
                                max_sequence_length=16)
    data_config = {"diffusion": asdict(diffusion), "prompts": asdict(PromptSpec(source=str(prompts), test_fraction=0.5)),
                   "generation": asdict(generation), "capture": asdict(CaptureSpec()),
                   "labels": {"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}}, "mode": "cached"}
    spec = ProbeSpec(layers=list(registry_for(pipe, 32, 32)), steps=range(STEPS),
                     timesteps=sampler_timesteps(pipe, generation), tasks=("foreground", "depth"), label_size=(32, 32),
                     target_stats={"depth": {"mean": 0.6, "std": 0.3}}, model=diffusion.identity(), is_random=True,
                     store_dir=str(tmp / "store"), data_config=data_config)
    module = ProbeModule(tasks=["foreground", "depth"])
    module.build(spec)
    return export_probes(module, tmp / "export")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_intervene_edits_sd3_joint_blocks(sd3_export, tmp_path):
    out = tmp_path / "run"
    main(["intervene", "--config", str(REPO_ROOT / "configs/intervention/foreground.yaml"), "--probes", str(sd3_export),
          "--steps", "[0, 1]", "--layers", "[joint1, joint2]", "--iterations", "4", "--images", "2", "--video",
          "false", "--out", str(out), "--progress", "false"])
    per_image = read(out / "per_image.csv")
    after = [float(r["value"]) for r in per_image if r["metric"] == "probe_loss_after" and r["condition"] == "edit"]
    before = [float(r["value"]) for r in per_image if r["metric"] == "probe_loss_before" and r["condition"] == "edit"]
    assert len(after) == 2 and all(a < b for a, b in zip(after, before))
    moved = [float(r["value"]) for r in per_image if r["metric"] == "pixel_mae" and r["condition"] == "edit"]
    assert all(v > 0 for v in moved)                  # the written-back tokens reach the image


def test_zero_iterations_leave_sd3_images_unchanged(sd3_export, tmp_path):
    from probes.experiments.intervention.config import InterventionConfig
    from probes.experiments.intervention.run import intervene

    out = intervene(InterventionConfig(str(sd3_export), task="depth", layers=["joint*"], steps=[0, 2], iterations=0,
                                       images=2, batch_size=2, video=False, out=str(tmp_path / "zero"), progress=False))
    pixel = [float(r["value"]) for r in read(out / "per_image.csv") if r["metric"] in ("pixel_mae", "pixel_max")]
    assert pixel and all(v == 0 for v in pixel)


def test_latent_mode_on_a_transformer_is_refused_before_any_image(sd3_export, tmp_path):
    from probes.experiments.intervention.config import InterventionConfig
    from probes.experiments.intervention.run import intervene

    with pytest.raises(ValueError, match="has no U-Net; use mode: activation"):
        intervene(InterventionConfig(str(sd3_export), mode="both", layers=["joint1"], steps=[0], images=2,
                                     out=str(tmp_path / "latent"), progress=False))
    assert not (tmp_path / "latent").exists()


def test_editor_writes_flux_single_stream_image_tokens_back_and_leaves_the_text():
    """FLUX's single-stream blocks: an edit of the image tokens reaches exactly the image stream the
    next block reads, the text stream stays the block's own, and an edit of nothing is the unedited
    image, bit for bit."""
    from types import SimpleNamespace

    _, pipe = tiny("flux")
    layer = registry_for(pipe, 32, 32).get("single0")
    spec = GenerationSpec(steps=2, batch_size=2, height=32, width=32, scheduler="native", guidance_scale=1.0,
                          max_sequence_length=16)
    records = [PromptRecord(index=i, prompt=p, seed=i, split="test") for i, p in enumerate(["a cube", "a ball"])]
    probe = SimpleNamespace(info=SimpleNamespace(layer="single0", step=1, key="foreground/single0/1"))
    target = torch.zeros(2, 32, 32)

    def next_block_inputs(editor=None):
        seen = []
        handle = pipe.transformer.single_transformer_blocks[1].register_forward_pre_hook(
            lambda m, a, k: seen.append((k["hidden_states"].clone(), k["encoder_hidden_states"].clone())),
            with_kwargs=True)
        try:
            images = sample_images(pipe, records, spec, [editor] if editor is not None else [])
        finally:
            handle.remove()
        return images, seen

    plain, (_, (image1, text1)) = next_block_inputs()
    still = ActivationEditor(pipe.transformer, [probe], [layer], target, EditSettings(iterations=0), cfg="none")
    still._objective = lambda key, device: (lambda z: z.sum((1, 2)))    # a stand-in loss: no probe needed
    same, _ = next_block_inputs(still)
    assert np.array_equal(same, plain) and len(still.records) == 1

    shift = ActivationEditor(pipe.transformer, [probe], [layer], target, EditSettings(), cfg="none")
    shift._objective = lambda key, device: None
    shift._optimise = lambda key, acts, objective: (acts + 1.0, torch.zeros(2), torch.zeros(2))
    _, (_, (edited_image1, edited_text1)) = next_block_inputs(shift)
    assert edited_image1.shape[1] == layer.tokens
    torch.testing.assert_close(edited_image1, image1 + 1.0, rtol=1e-5, atol=1e-5)    # step 1: the edited tokens
    assert torch.equal(edited_text1, text1)                                          # the text stream: untouched
