"""Model minus control: each run's head is picked on its own validation split, and the difference is paired by
test image index (only the images both runs scored), with the interval of scipy's paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from probes.metrics.bootstrap import difference_interval
from probes.metrics.per_image import PerImageScores
from probes.reporting.beyond_position import compare

LAYERS, STEPS = ["up3.0", "mid.0"], [3]


def rows(val_best: str, val_best_with_prior: str) -> list[dict]:
    """metrics.csv rows whose val split prefers ``val_best`` (probe) and ``val_best_with_prior`` (gain head);
    the test values are set to prefer the other layer, which must never be picked."""
    out = []
    for layer in LAYERS:
        for split in ("val", "test"):
            good = (layer == val_best) == (split == "val")
            good_wp = (layer == val_best_with_prior) == (split == "val")
            out.append({"split": split, "task": "depth", "layer": layer, "step": 3, "timestep": 785.7,
                        "metric": "spearman", "value": 0.9 if good else 0.1, "with_prior": 0.95 if good_wp else 0.2})
    return out


def scores(index: list[int], seed: int) -> PerImageScores:
    rng = np.random.default_rng(seed)
    n = len(index)
    return PerImageScores(np.array(index), LAYERS, STEPS, {"depth": ["spearman"]},
                          {"depth/probe": rng.uniform(size=(1, 2, 1, n)), "depth/with_prior": rng.uniform(size=(1, 2, 1, n)),
                           "depth/prior": rng.uniform(size=(1, n)), "depth/plane": rng.uniform(size=(1, n))})


def test_differences_use_each_runs_val_picked_heads_paired_by_image():
    model, control = scores([0, 1, 2, 3, 4, 5, 6, 7], 0), scores([2, 3, 4, 5, 6, 7, 8, 9], 1)
    d = compare((rows("up3.0", "mid.0"), model), (rows("mid.0", "up3.0"), control), "depth", resamples=1000)
    a = model.head("depth", "spearman", "up3.0", 3)[2:]          # images 2..7, the ones both runs have
    b = control.head("depth", "spearman", "mid.0", 3)[:6]
    want = difference_interval(a, b, resamples=1000)
    assert d["probe"].n == 6 and d["probe"].estimate == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert (d["probe"].low, d["probe"].high) == pytest.approx((want.low, want.high), rel=1e-12)
    ga = (model.head("depth", "spearman", "mid.0", 3, "with_prior") - model.baseline("depth", "spearman", "prior"))[2:]
    gb = (control.head("depth", "spearman", "up3.0", 3, "with_prior") - control.baseline("depth", "spearman", "prior"))[:6]
    assert d["gain"].estimate == pytest.approx(float(np.mean(ga - gb)), rel=1e-12)


def test_without_per_image_scores_there_is_nothing_to_compare():
    assert compare((rows("up3.0", "up3.0"), None), (rows("mid.0", "mid.0"), scores([0, 1], 0)), "depth") == \
        {"probe": None, "gain": None}
