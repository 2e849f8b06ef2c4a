"""``train.py fit --config configs/toy/exact.yaml`` end to end on a few scenes: renders -> store ->
exact labels -> ridge probes -> metrics.csv, with nothing downstream of the store told it holds renders."""
from __future__ import annotations

import csv

import pytest

from probes.diffusion.loading import local_model_dir
from tests.e2e.test_cli import run_inprocess

pytestmark = pytest.mark.skipif(local_model_dir("data/toy/model") is None,
                                reason="data/toy/model absent (make toy-model)")


def test_exact_config_fits_and_scores_every_task(tmp_path):
    run_inprocess("fit", "--config", "configs/toy/exact.yaml", "--data.prompts.limit", "6",
                  "--data.capture.layers", '["mid.0", "up3.2"]', "--data.capture.steps", "[0, 14]",
                  "--trainer.logger", "false", "--outputs.plots", "false",
                  "--data.store_root", str(tmp_path / "s"), "--run_dir", str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"foreground", "depth", "shading"}
    (manifest,) = (tmp_path / "s").rglob("manifest.json")
    assert '"start": "renders"' in manifest.read_text()
    labelers = {p.parent.parent.name: p.parent.name for p in (tmp_path / "s").rglob("labels.npy")}
    assert set(labelers) == {"foreground", "depth", "shading"}
    assert all(name.startswith("toy_exact-") for name in labelers.values()), labelers
