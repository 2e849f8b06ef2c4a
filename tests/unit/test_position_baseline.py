"""The run's position baselines from its label caches: the prior map is the numpy mean of the train targets,
the plane a least-squares fit in pixel coordinates, thresholds come from val, and both are scored per image."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from probes.metrics.prior_map import PLANE, PRIOR, coordinates
from probes.training.position import fit_position, position_scores


class _Cache:
    def __init__(self, arr):
        self._arr = arr

    def array(self):
        return self._arr


class _Split:
    def __init__(self, indices):
        self.indices = indices


STATS = {"depth": {"mean": 7.5, "std": 4.6}, "shading": {"mean": 0.0, "std": 1.0}}


def targets(task, raw):
    """A probe module's ``targets``: masks for binary tasks, z-scores for regression."""
    if task.kind == "binary":
        return (raw > 0).float()
    s = STATS[task.name]
    return (raw.float() - s["mean"]) / s["std"]


def _dm(labels, n_train, n_val):
    n = len(next(iter(labels.values())))
    return type("DM", (), {"datasets": {"train": _Split(list(range(n_train))),
                                        "val": _Split(list(range(n_train, n_train + n_val))),
                                        "test": _Split(list(range(n_train + n_val, n)))},
                           "label_caches": {t: _Cache(a) for t, a in labels.items()}})()


def test_height_only_labels_are_found_by_position_and_noise_is_not():
    rng = np.random.default_rng(1)
    h, w, n = 16, 16, 16
    rows_idx = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1)           # [H, W]: the row index
    height_depth = np.repeat(rows_idx[None], n, 0) + rng.normal(scale=0.1, size=(n, h, w)).astype(np.float32)
    noise = rng.normal(size=(n, h, w)).astype(np.float32)
    left = np.zeros((n, h, w), np.float32)
    left[:, :, : w // 2] = 1.0                                         # "objects sit on the left"
    dm = _dm({"depth": height_depth, "shading": noise, "foreground": left}, n_train=8, n_val=4)
    position = fit_position(targets, dm, ["depth", "shading", "foreground"])
    # the prior map is the numpy mean of the train targets; the plane the lstsq fit of (1, x, y) to it
    z = (height_depth[:8].astype(np.float64) - 7.5) / 4.6
    np.testing.assert_allclose(position["depth"][PRIOR].map, z.mean(0), rtol=1e-5, atol=1e-6)   # float32 targets
    coef, *_ = np.linalg.lstsq(coordinates(h, w), z.mean(0).ravel(), rcond=None)
    np.testing.assert_allclose(position["depth"][PLANE].map.ravel(), coordinates(h, w) @ coef, rtol=1e-5, atol=1e-6)
    assert position["depth"][PRIOR].threshold is None and position["foreground"][PRIOR].threshold is not None
    idx, scores = position_scores(targets, dm, position, "test")
    assert idx == [12, 13, 14, 15] and scores["depth"][PRIOR].shape == (4, 3)
    expected = [spearmanr(z.mean(0).ravel(), height_depth[i].ravel())[0] for i in idx]
    np.testing.assert_allclose(scores["depth"][PRIOR][:, 0], expected, atol=1e-9)
    assert abs(scores["shading"][PRIOR][:, 0].mean()) < 0.2
    assert scores["foreground"][PRIOR][:, 0].mean() > 0.99 and scores["foreground"][PLANE][:, 0].mean() > 0.99


def test_a_binary_task_without_validation_images_fits_its_threshold_on_train():
    """A run without val (nothing is selected there) still gets its prior map: the map and its
    threshold both come from train, never from test."""
    masks = np.zeros((6, 4, 4), np.float32)
    masks[:, :2] = 1
    position = fit_position(targets, _dm({"foreground": masks}, n_train=6, n_val=0), ["foreground"])
    prior = position["foreground"][PRIOR]
    assert prior.threshold is not None
    assert np.array_equal(prior.map > prior.threshold, masks[0] > 0.5)
    assert torch.is_tensor(targets(type("T", (), {"kind": "binary"})(), torch.ones(1)))
