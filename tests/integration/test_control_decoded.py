"""The protocol's controls: permuted U-Net weights, and labelers on decoded intermediate images."""
from __future__ import annotations

import numpy as np
import pytest

from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.models.layers import LayerRegistry
from probes.models.loading import DiffusionSpec
from probes.prompts.sets import PromptRecord, PromptSpec
from probes.training.datamodule import ActivationDataModule
from tests.conftest import REPO

RECS = [PromptRecord(index=i, prompt=f"a photo of a dog {i}", seed=i, split="test") for i in range(2)]


def test_pipeline_uses_sdpa_attention(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())


def test_decoded_x0_images_per_step_without_changing_the_result(tiny_pipe):
    lay = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)).select(["mid.0"])
    plain = list(generate(tiny_pipe, RECS, [0, 1], GenerationSpec(batch_size=2), lay, CaptureSpec(), progress=False))[0]
    withx0 = list(generate(tiny_pipe, RECS, [0, 1], GenerationSpec(batch_size=2, decode_x0=True), lay,
                           CaptureSpec(steps=[0, 7, 14]), progress=False))[0]
    assert plain.x0_images is None
    assert withx0.x0_images.shape == (2, 3, 128, 128, 3) and withx0.x0_images.dtype == np.uint8
    assert np.array_equal(withx0.images, plain.images)  # recording x0 does not change the sampler
    early, late = withx0.x0_images[:, 0].astype(float), withx0.x0_images[:, 2].astype(float)
    final = withx0.images.astype(float)
    assert np.abs(late - final).mean() < np.abs(early - final).mean()  # x0 converges to the image


def test_decode_x0_needs_a_sampler_that_predicts_x0(tiny_pipe):
    lay = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)).select(["mid.0"])
    with pytest.raises(ValueError, match="PNDMScheduler does not"):
        list(generate(tiny_pipe, RECS, [0], GenerationSpec(scheduler="pndm", decode_x0=True), lay, CaptureSpec(),
                      progress=False))


def dm(tmp, **diffusion):
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny", **diffusion),
        prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=3, val_fraction=0.3),
        generation=GenerationSpec(steps=4, batch_size=4, decode_x0=True), capture=CaptureSpec(layers=["up3.0", "mid.0"]),
        labels={"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}}, store_root=str(tmp), device="cpu",
        progress=False)


def test_labels_on_decoded_images_are_scored_per_step(tmp_path):
    import pytorch_lightning as pl

    from probes.metrics.decoded import DECODED, decoded_rows
    from probes.training.ridge import RidgeProbeModule

    d = dm(tmp_path)
    module = RidgeProbeModule()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=d)
    trainer.test(module, datamodule=d, verbose=False)
    x0 = d.x0_label_caches["depth"].array()
    assert x0.shape == (d.store.num_samples, 4, 128, 128)
    rows = decoded_rows(module, d)
    assert {(r["task"], r["metric"]) for r in rows} == {("foreground", "dice"), ("depth", "spearman"),
                                                       ("depth", "pearson"), ("depth", "rmse")}
    assert all(r["layer"] == DECODED for r in rows) and sorted({r["step"] for r in rows}) == [0, 1, 2, 3]
    # at the last step the decoded x0 is nearly the final image, so its labels nearly agree
    last = {(r["task"], r["metric"]): r["value"] for r in rows if r["step"] == 3}
    first = {(r["task"], r["metric"]): r["value"] for r in rows if r["step"] == 0}
    assert last[("depth", "spearman")] > first[("depth", "spearman")]
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
