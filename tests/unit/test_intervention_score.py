"""Intervention scores: overlap, centroid displacement, the success rule, depth ranks, aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from probes.experiments.intervention.score import (
    aggregate,
    move_scores,
    pixel_difference,
    score_foreground,
    score_regression,
)
from probes.metrics.maps import mask_dice as dice
from probes.metrics.maps import mask_iou as iou


def square(y: int, x: int, size: int = 64, side: int = 8) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + side, x:x + side] = True
    return m


def test_overlap_scores():
    a, b = square(0, 0), square(0, 4)
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    assert iou(a, b) == pytest.approx(32 / 96)
    empty = np.zeros((64, 64), bool)
    assert dice(empty, empty) == pytest.approx(1) and iou(empty, empty) == pytest.approx(1)


@pytest.mark.parametrize(("moved_to", "success"), [
    ((30, 30), 1.0),     # (y, x): exactly the requested shift (+10 x, +20 y)
    ((20, 25), 1.0),     # exactly half of it: the boundary counts
    ((19, 25), 0.0),     # a little less than half
    ((0, 15), 0.0),      # the opposite direction
    ((0, 40), 0.0),      # perpendicular: as far as requested, but its projection on the shift is 0
])
def test_success_is_half_the_distance_in_the_requested_direction(moved_to, success):
    original, edited = square(10, 20), square(*moved_to)
    s = move_scores(original, edited, (10, 20))      # shift (dx, dy)
    assert s["success"] == success
    assert s["displacement_x"] == pytest.approx(moved_to[1] - 20)
    assert s["displacement_y"] == pytest.approx(moved_to[0] - 10)


def test_vanished_objects_fail_and_missing_objects_are_not_scored():
    empty = np.zeros((64, 64), bool)
    assert move_scores(square(10, 10), empty, (10, 0))["success"] == 0.0
    assert math.isnan(move_scores(empty, square(10, 10), (10, 0))["success"])


def test_foreground_scores_against_three_references():
    original = square(10, 10)
    target = square(10, 20)
    s = score_foreground(original, target, target.astype(np.float32), target.astype(np.float32), (10, 0))
    assert s["dice_target"] == pytest.approx(1) and s["dice_requested"] == pytest.approx(1)
    assert s["dice_original"] == pytest.approx(0, abs=1e-6) and s["progress"] == pytest.approx(1)


def test_regression_scores():
    y = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    s = score_regression(original=-y, edited=2 * y + 1, target=y, requested=y)
    assert s["spearman_target"] == pytest.approx(1) and s["spearman_original"] == pytest.approx(-1)
    assert s["success"] == 1.0
    assert math.isnan(score_regression(y, np.ones_like(y), y, y)["success"])


def test_pixel_difference():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert pixel_difference(b, a) == {"pixel_mae": pytest.approx(255 / 48), "pixel_max": 255.0}


def test_aggregate_means_rates_and_counts():
    rows = []
    for index, (success, mae) in enumerate([(1.0, 1.0), (0.0, 3.0), (math.nan, 2.0)]):
        rows += [{"split": "test", "index": index, "condition": "edit", "metric": "success", "value": success},
                 {"split": "test", "index": index, "condition": "edit", "metric": "pixel_max", "value": mae}]
    out = {r["metric"]: r["value"] for r in aggregate(rows)}
    assert out["success_rate"] == pytest.approx(0.5) and out["n_scored"] == 2 and out["n_images"] == 3
    assert out["pixel_max"] == pytest.approx(2) and out["pixel_max_worst"] == 3
