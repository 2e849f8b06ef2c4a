"""Non-finite values must stop a run with an error naming the file and the sample, never become
plausible numbers (issue 9, item 2): a NaN label pixel made every depth Spearman 0.989, a NaN
activation gave Dice 1.5e-10 and Pearson 0.0 with exit 0, and ``best_heads`` dropped NaN quietly."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl

from probes.bench.planted import planted_datamodule
from probes.reporting.tables import best_heads
from probes.training.datamodule import ActivationDataModule
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule
from probes.training.target_stats import target_stats


def trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def reopened(dm: ActivationDataModule) -> ActivationDataModule:
    """A fresh data module on the same store (labels already cached), as a rerun would build it."""
    return ActivationDataModule(diffusion=dm.diffusion, prompts=dm.prompts, generation=dm.generation,
                                capture=dm.capture, labels=dm.labels, store_dir=dm.store_dir,
                                batch_size=dm.batch_size, device="cpu", progress=False)


def corrupt(path, index: int, where=(0, 0, 0)) -> None:
    """Write one NaN into row ``index`` of a .npy file, in place (a hostile tester's edit)."""
    arr = np.load(path, mmap_mode="r+")
    arr[(index, *where)] = np.nan
    arr.flush()
    del arr


@pytest.fixture
def planted(tmp_path):
    dm = planted_datamodule(tmp_path, n=16)
    dm.setup("fit")                       # labels computed and cached
    return dm


def sample_of(dm: ActivationDataModule, split: str) -> int:
    return dm.datasets[split].indices[1]


def test_nan_pixel_in_a_label_cache_names_file_sample_and_prompt(planted):
    i = sample_of(planted, "test")
    path = planted.label_caches["depth"].path
    corrupt(path, i, (3, 5))
    dm = reopened(planted)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(path) in msg and f"sample {i}" in msg and f"synthetic {i}" in msg and "depth" in msg
    assert "delete" in msg  # the fix: recompute the cache


def test_nan_activation_stops_training_naming_task_layer_step_and_sample(planted):
    i = sample_of(planted, "train")
    corrupt(planted.store.root / "acts" / "up3.0.npy", i, (1, 0, 2, 3))   # step 1, cond half, token 2
    dm = reopened(planted)
    with pytest.raises(ValueError) as err:
        trainer().fit(ProbeModule(), datamodule=dm)
    msg = str(err.value)
    assert "up3.0" in msg and "step 1" in msg and f"sample {i}" in msg and f"synthetic {i}" in msg
    assert "acts/up3.0.npy" in msg and "train" in msg


def test_nan_activation_in_the_test_split_stops_testing(planted):
    i = sample_of(planted, "test")
    corrupt(planted.store.root / "acts" / "mid.0.npy", i, (0, 0, 0, 0))
    dm = reopened(planted)
    t = trainer()
    module = ProbeModule()
    t.fit(module, datamodule=dm)
    with pytest.raises(ValueError) as err:
        t.test(module, datamodule=dm, verbose=False)
    msg = str(err.value)
    assert "mid.0" in msg and "step 0" in msg and f"sample {i}" in msg and "test" in msg


def test_nan_activation_stops_the_ridge_probes(planted):
    i = sample_of(planted, "val")
    corrupt(planted.store.root / "acts" / "up3.0.npy", i, (0, 0, 1, 1))
    dm = reopened(planted)
    with pytest.raises(ValueError) as err:
        trainer().fit(RidgeProbeModule(), datamodule=dm)
    msg = str(err.value)
    assert "up3.0" in msg and f"sample {i}" in msg and "val" in msg


def test_target_stats_refuse_non_finite_labels():
    labels = np.zeros((4, 8, 8), np.float32)
    labels[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        target_stats(labels, [0, 1, 2, 3])


def test_best_heads_does_not_drop_nan_quietly():
    rows = [{"split": s, "task": "depth", "layer": layer, "step": 0, "timestep": 999.0, "metric": "spearman",
             "value": v} for s in ("val", "test") for layer, v in (("a", 0.2), ("b", float("nan")))]
    with pytest.raises(ValueError) as err:
        best_heads(rows)
    assert "depth" in str(err.value) and "spearman" in str(err.value) and "b" in str(err.value)
