"""The prior map and the plane: plain numpy means and fits; binary thresholds chosen on val only."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from probes.metrics.image_scores import dice
from probes.metrics.prior_map import (
    PLANE,
    PRIOR,
    best_dice_threshold,
    best_threshold,
    coordinates,
    fit_position_baselines,
    plane_map,
    prior_map,
)


def test_prior_map_is_the_per_pixel_mean_of_the_train_labels_in_any_batching():
    labels = np.random.default_rng(0).normal(size=(7, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(prior_map(labels), labels.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(prior_map(iter([labels[:3], labels[3:]])), labels.astype(np.float64).mean(0),
                               rtol=1e-12)


def test_plane_is_least_squares_over_all_train_pixels():
    labels = np.random.default_rng(1).normal(size=(4, 5, 6))
    a = np.tile(coordinates(5, 6), (4, 1))                      # every pixel of every image
    coef, *_ = np.linalg.lstsq(a, labels.reshape(-1), rcond=None)
    np.testing.assert_allclose(plane_map(prior_map(labels)).ravel(), coordinates(5, 6) @ coef, atol=1e-12)


def test_regression_baselines_predict_the_same_map_for_every_image():
    labels = np.random.default_rng(2).normal(size=(4, 3, 3))
    base = fit_position_baselines(labels)
    assert set(base) == {PRIOR, PLANE} and base[PRIOR].threshold is None
    pred = base[PRIOR].predict(5)
    assert pred.shape == (5, 3, 3)
    np.testing.assert_array_equal(pred[4], labels.mean(0))


def _masks(rng, n, frac_rows):
    """Object masks covering the top ``frac_rows`` rows of a 10x10 image, with random extra pixels."""
    m = np.zeros((n, 10, 10), bool)
    for i in range(n):
        m[i, : rng.integers(1, frac_rows + 1)] = True
        m[i] |= rng.random((10, 10)) < 0.05
    return m


def test_dice_sweep_equals_brute_force_over_every_distinct_threshold():
    rng = np.random.default_rng(3)
    score_map = rng.integers(0, 6, size=(10, 10)) / 5.0          # ties between pixels
    val = _masks(rng, 9, 6)
    tau, best = best_dice_threshold(score_map, val)
    grid = [-np.inf, *np.unique(score_map)]
    brute = [dice(np.broadcast_to(score_map > c, val.shape), val).mean() for c in grid]
    assert best == pytest.approx(max(brute), abs=1e-12)
    assert dice(np.broadcast_to(score_map > tau, val.shape), val).mean() == pytest.approx(best, abs=1e-12)


def test_the_binary_threshold_is_picked_on_val_not_on_test():
    rng = np.random.default_rng(4)
    train = _masks(rng, 40, 8)                   # prior: high at the top rows, falling down the image
    val = _masks(rng, 30, 2)                     # val objects are small: a high threshold wins there
    test = _masks(rng, 30, 8)                    # test objects are large: a low threshold wins there
    base = fit_position_baselines(train, val, binary=True)
    prior = base[PRIOR].map

    def best_on(masks):
        return max(np.unique(prior), key=lambda c: dice(np.broadcast_to(prior > c, masks.shape), masks).mean())

    tau = base[PRIOR].threshold
    assert np.array_equal(prior > tau, prior > best_on(val))          # the same cut, placed mid-gap
    assert not np.isin(tau, prior)                                    # no pixel sits on it
    assert best_on(test) != pytest.approx(best_on(val))              # the two splits disagree here
    assert base[PLANE].threshold is not None
    assert "test" not in inspect.signature(fit_position_baselines).parameters
    with pytest.raises(ValueError, match="validation"):
        fit_position_baselines(train, None, binary=True)


def test_another_metric_is_tried_on_candidate_thresholds():
    rng = np.random.default_rng(5)
    score_map = rng.random((10, 10))
    val = _masks(rng, 5, 4)
    tau, value = best_threshold(score_map, val, score=dice, candidates=np.array([0.2, 0.5, 0.8]))
    scores = {c: dice(np.broadcast_to(score_map > c, val.shape), val).mean() for c in (0.2, 0.5, 0.8)}
    assert tau == max(scores, key=scores.get) and value == pytest.approx(max(scores.values()))


def test_non_finite_labels_are_refused_with_the_count():
    labels = np.zeros((2, 3, 3))
    labels[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        prior_map(labels)
