"""Probes recover a planted linear signal, and find nothing where there is none."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl

from probes.bench.planted import synthetic_datamodule, upsample_tokens
from probes.diffusion.layers import LayerInfo
from probes.training.module import ProbeModule

A = LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=8, grid=(4, 4))
B = LayerInfo("mid.0", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=6, grid=(2, 2))
SIZE, STEPS = 16, 2
W_DEPTH = np.random.default_rng(10).normal(size=8)
W_FG = np.random.default_rng(11).normal(size=8)


def acts(rng, layer):
    return rng.normal(size=(STEPS, layer.tokens, layer.channels))


LABELS = {
    # the signal lives in layer up3.0 at step 1 only
    "depth": lambda a, rng: upsample_tokens(a["up3.0"][1] @ W_DEPTH, A.grid, SIZE) + 0.05 * rng.normal(size=(SIZE, SIZE)),
    "foreground": lambda a, rng: upsample_tokens((a["up3.0"][1] @ W_FG > 0).astype(float), A.grid, SIZE),
    "shading": lambda a, rng: rng.normal(size=(SIZE, SIZE)),  # random target: nothing to find
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pl.seed_everything(0)
    dm = synthetic_datamodule(tmp_path_factory.mktemp("planted"), n=48, layers=[A, B], steps=STEPS, size=SIZE,
                              acts_fn=acts, label_fns=LABELS)
    module = ProbeModule(lr=0.05)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=25, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return {(r["split"], r["task"], r["layer"], r["step"], r["metric"]): r["value"]
            for split in ("val", "test") for r in module.results[split]}


def test_planted_signal_is_recovered(results):
    assert results[("test", "depth", "up3.0", 1, "spearman")] > 0.97
    assert results[("test", "depth", "up3.0", 1, "pearson")] > 0.97
    assert results[("test", "depth", "up3.0", 1, "rmse")] < 0.25
    assert results[("test", "foreground", "up3.0", 1, "dice")] > 0.9


def test_heads_without_signal_stay_near_chance(results):
    for layer, step in [("up3.0", 0), ("mid.0", 0), ("mid.0", 1)]:
        assert abs(results[("test", "depth", layer, step, "spearman")]) < 0.3, (layer, step)
    for layer, step in [("up3.0", 0), ("mid.0", 0), ("mid.0", 1)]:
        assert results[("test", "foreground", layer, step, "dice")] < 0.65, (layer, step)
    for layer in ("up3.0", "mid.0"):
        for step in range(STEPS):
            assert abs(results[("test", "shading", layer, step, "spearman")]) < 0.15
            assert results[("test", "shading", layer, step, "rmse")] > 0.9  # z-units: no better than the mean
