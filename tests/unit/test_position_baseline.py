"""The position-only baseline: a least-squares fit on pixel coordinates, scored like a probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from probes.metrics.position import POSITION, coordinate_features, fit_position_map, position_rows


def test_fit_is_numpy_least_squares_on_coordinates():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(6, 8))
    x = coordinate_features(6, 8).numpy()
    coef, *_ = np.linalg.lstsq(x, target.reshape(-1), rcond=None)
    np.testing.assert_allclose(fit_position_map(torch.from_numpy(target)).numpy(), x @ coef, atol=1e-12)


class _Cache:
    def __init__(self, arr):
        self._arr = arr

    def array(self):
        return self._arr


class _Split:
    def __init__(self, indices):
        self.indices = indices


class _Module:
    """What position_rows reads of a probe module: its banks (task names), spec and targets()."""

    def __init__(self, tasks, size, stats):
        self.banks = dict.fromkeys(tasks)
        self.spec = type("Spec", (), {"label_size": size, "steps": (0, 1), "timesteps": (999.0, 0.0),
                                      "target_stats": stats})()

    def targets(self, task, raw):
        if task.kind == "binary":
            return (raw > 0).float()
        s = self.spec.target_stats[task.name]
        return (raw.float() - s["mean"]) / s["std"]


def _dm(labels, n_train):
    n = len(next(iter(labels.values())))
    return type("DM", (), {"datasets": {"train": _Split(list(range(n_train))), "test": _Split(list(range(n_train, n)))},
                           "label_caches": {t: _Cache(a) for t, a in labels.items()}})()


def test_a_label_that_is_only_image_height_is_found_and_noise_is_not():
    rng = np.random.default_rng(1)
    h, w, n = 16, 16, 12
    rows_idx = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1)           # [H, W]: the row index
    height_depth = np.repeat(rows_idx[None], n, 0) + rng.normal(scale=0.1, size=(n, h, w)).astype(np.float32)
    noise = rng.normal(size=(n, h, w)).astype(np.float32)
    centre = np.zeros((n, h, w), np.float32)
    centre[:, :, : w // 2] = 1.0                                      # "objects sit on the left"
    module = _Module(["depth", "shading", "foreground"], (h, w),
                     {"depth": {"mean": 7.5, "std": 4.6}, "shading": {"mean": 0.0, "std": 1.0}})
    rows = position_rows(module, _dm({"depth": height_depth, "shading": noise, "foreground": centre}, n_train=8))
    got = {(r["task"], r["metric"]): r["value"] for r in rows if r["step"] == 0}
    assert {r["layer"] for r in rows} == {POSITION} and {r["step"] for r in rows} == {0, 1}
    x = coordinate_features(h, w).numpy()                             # the same fit by hand: mean train map
    coef, *_ = np.linalg.lstsq(x, ((height_depth[:8] - 7.5) / 4.6).mean(0).ravel(), rcond=None)
    expected = np.mean([spearmanr(x @ coef, height_depth[i].ravel())[0] for i in range(8, n)])
    assert got[("depth", "spearman")] == pytest.approx(expected, abs=1e-6)
    assert abs(got[("shading", "spearman")]) < 0.2
    assert got[("foreground", "dice")] > 0.99
