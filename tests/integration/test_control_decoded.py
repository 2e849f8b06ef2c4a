"""The protocol's controls: permuted U-Net weights, and labelers on decoded intermediate images."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.prompts.sets import PromptRecord, PromptSpec
from probes.training.datamodule import ActivationDataModule
from tests.conftest import REPO

RECS = [PromptRecord(index=i, prompt=f"a photo of a dog {i}", seed=i, split="test") for i in range(2)]


def test_pipeline_uses_sdpa_attention(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())


def decoded(pipe, decode: str, captured: list[int], **spec) -> object:
    lay = LayerRegistry.from_unet(pipe.unet, (16, 16)).select(["mid.0"])
    return list(generate(pipe, RECS, [0, 1], GenerationSpec(batch_size=2, decode=decode, **spec), lay,
                         CaptureSpec(steps=captured), progress=False))[0]


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_noisy_and_x0_decodes_per_step_without_changing_the_result(tiny_pipe):
    plain = decoded(tiny_pipe, "none", [0, 3, 5], steps=6)
    noisy, x0 = decoded(tiny_pipe, "noisy", [0, 3, 5], steps=6), decoded(tiny_pipe, "x0", [0, 3, 5], steps=6)
    assert plain.decoded_images is None and plain.decoded_indices == []
    for b in (noisy, x0):
        assert b.decoded_images.shape == (2, 3, 128, 128, 3) and b.decoded_images.dtype == np.uint8
        assert np.array_equal(b.images, plain.images)   # recording a latent does not change the sampler
    # the last step's noisy latent x_{S-1} IS the final latent: its decode is the final image
    # (within one uint8 level: the VAE decodes it in another batch than the pipeline's own decode)
    assert np.abs(noisy.decoded_images[:, 2].astype(int) - noisy.images.astype(int)).max() <= 1
    # the two latents differ at step 0 (that the noisy one is farther from the final image is a property
    # of a trained model, not of random weights: the toy model's test checks it)
    assert not np.array_equal(noisy.decoded_images[:, 0], x0.decoded_images[:, 0])
    assert distance(x0.decoded_images[:, 2], x0.images) < distance(x0.decoded_images[:, 0], x0.images)  # x0 converges


def test_decode_x0_needs_a_sampler_that_predicts_x0(tiny_pipe):
    for name in ("pndm", "dpm"):
        with pytest.raises(ValueError, match=f"decode=x0 needs a sampler.*'{name}' does not.*decode=noisy"):
            GenerationSpec(scheduler=name, decode="x0")     # refused before any compute
    # the noisy latent is the pipeline's own: any sampler has it
    assert decoded(tiny_pipe, "noisy", [0, 2], scheduler="dpm", steps=3).decoded_images.shape[:2] == (2, 2)


def test_decode_option_names_its_values_and_maps_the_old_key():
    with pytest.raises(ValueError, match="generation.decode must be one of none | noisy | x0, got 'yes'"):
        GenerationSpec(decode="yes")
    with pytest.warns(FutureWarning, match="decode_x0 is deprecated: it means generation.decode: x0"):
        old = GenerationSpec(decode_x0=True)        # configs and probe exports written before `decode`
    assert old.decode == "x0" and "decode_x0" not in asdict(old)
    assert GenerationSpec(decode_x0=False).decode == "none"
    with pytest.raises(ValueError, match="disagree"):
        GenerationSpec(decode="noisy", decode_x0=True)


def dm(tmp, decode="noisy", **diffusion):
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny", **diffusion),
        prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=3, val_fraction=0.3),
        generation=GenerationSpec(steps=4, batch_size=4, decode=decode), capture=CaptureSpec(layers=["up3.0", "mid.0"]),
        labels={"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}}, store_root=str(tmp), device="cpu",
        progress=False)


@pytest.mark.parametrize("decode", ["noisy", "x0"])
def test_labels_on_decoded_images_are_scored_per_step(tmp_path, decode):
    import pytorch_lightning as pl

    from probes.metrics.decoded import decoded_rows
    from probes.training.ridge import RidgeProbeModule

    d = dm(tmp_path, decode)
    module = RidgeProbeModule()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=d)
    trainer.test(module, datamodule=d, verbose=False)
    labels = d.decoded_label_caches["depth"]
    assert labels.array().shape == (d.store.num_samples, 4, 128, 128)
    assert labels.path.name == f"{decode}_labels.npy"      # filed under the latent they were computed on
    rows = decoded_rows(module, d)
    assert {(r["task"], r["metric"]) for r in rows} == {("foreground", "dice"), ("depth", "spearman"),
                                                       ("depth", "pearson"), ("depth", "rmse")}
    assert {r["layer"] for r in rows} == {f"decoded_{decode}"} and sorted({r["step"] for r in rows}) == [0, 1, 2, 3]
    last = {(r["task"], r["metric"]): r["value"] for r in rows if r["step"] == 3}
    first = {(r["task"], r["metric"]): r["value"] for r in rows if r["step"] == 0}
    assert last[("depth", "spearman")] > first[("depth", "spearman")]
    if decode == "noisy":   # the last noisy latent is the final latent: its labels are the final labels
        assert last[("depth", "spearman")] > 0.99 and last[("foreground", "dice")] > 0.99
    else:                   # the last predicted x0 is nearly the final image
        assert last[("depth", "spearman")] > 0.9


def test_permuted_weights_control_is_its_own_store_with_other_activations(tmp_path):
    real, control = dm(tmp_path), dm(tmp_path, permute_seed=0)
    assert real.resolved_store_dir() != control.resolved_store_dir()
    real.setup("fit")
    control.setup("fit")
    assert control.store.manifest["model"]["permute_seed"] == 0
    a = np.asarray(real.store.activation("up3.0", 0), np.float32)
    b = np.asarray(control.store.activation("up3.0", 0), np.float32)
    assert not np.allclose(a, b)
    assert control.probe_spec.model["permute_seed"] == 0
