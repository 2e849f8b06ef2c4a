"""``train.py fit --config configs/toy/exact.yaml`` end to end on a few scenes: renders -> store ->
exact labels -> ridge probes -> metrics.csv, with nothing downstream of the store told it holds renders;
the decoded-image baseline is the pseudo-labelers on decoded renders, scored against the exact labels."""
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
    # classification: the demo's classifier, on the decoded renders of the one-object test scenes
    assert {r["task"] for r in rows} - {"classification"} == {"foreground", "depth", "shading"}
    (manifest,) = (tmp_path / "s").rglob("manifest.json")
    assert '"start": "renders"' in manifest.read_text()
    labelers = {p.parent.parent.name: p.parent.name for p in (tmp_path / "s").rglob("labels.npy")
                if p.name == "labels.npy"}
    assert set(labelers) == {"foreground", "depth", "shading"}
    assert all(name.startswith("toy_exact-") for name in labelers.values()), labelers
    decoded = {p.parent.parent.name: p.parent.name for p in (tmp_path / "s").rglob("noisy_labels.npy")}
    assert decoded == {t: decoded[t] for t in labelers} and all(decoded[t].startswith(f"toy_{t}-") for t in decoded)
    last = {r["task"]: float(r["value"]) for r in rows if r["layer"] == "decoded_noisy" and r["split"] == "test"
            and r["step"] == "14" and r["metric"] in ("dice", "spearman")}
    assert set(last) == set(labelers) and min(last.values()) < 0.9999, last    # another labeler: not 1 by construction
    from probes.metrics.per_image import PerImageScores
    from probes.reporting.beyond_position import decoded_note

    pi = PerImageScores.load(tmp_path / "run" / "per_image.npz")
    assert pi.info["labeler"]["depth"] == "toy_exact" and pi.info["decoded_labeler"]["depth"] == "toy_depth"
    assert "not 1 by construction" in decoded_note(pi, "depth")     # what the reports' emergence tables say
