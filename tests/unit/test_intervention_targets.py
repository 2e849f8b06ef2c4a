"""Counterfactual targets: translation (pixel exact), shift draws, target units, random pairing, video paths."""
from __future__ import annotations

import numpy as np
import pytest

from probes.experiments.intervention.targets import (
    TargetMaker,
    offset_path,
    random_source,
    rescale,
    sample_shift,
    translate,
)


def test_translate_moves_a_pixel_right_and_down():
    x = np.zeros((8, 10), np.float32)
    x[2, 3] = 1
    y = translate(x, dx=4, dy=-1)
    assert y[1, 7] == 1 and y.sum() == 1


def test_translate_drops_what_leaves_and_fills_zero_or_edge():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    moved = translate(x, dx=1, dy=0)
    np.testing.assert_array_equal(moved, [[0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10]])
    edge = translate(x, dx=-2, dy=1, fill="edge")
    np.testing.assert_array_equal(edge, [[2, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7]])
    assert translate(x, dx=50, dy=0).sum() == 0          # moved out of the frame: nothing left
    with pytest.raises(ValueError, match="fill"):
        translate(x, 1, 1, fill="wrap")


def test_shifts_follow_the_reference_ranges_scaled_to_the_image():
    rng = np.random.default_rng(0)
    at512 = np.array([sample_shift(rng, (512, 512)) for _ in range(400)])
    pos, neg = at512[at512 > 0], at512[at512 < 0]
    assert pos.min() >= 90 and pos.max() <= 119 and neg.min() >= -120 and neg.max() <= -91 and len(pos) + len(neg) == 800
    assert (at512 > 0).any() and (at512 < 0).any() and set(np.unique(at512[:, 0] > 0)) == {False, True}
    at64 = np.abs([sample_shift(rng, (64, 64)) for _ in range(200)])
    assert at64.min() >= 11 and at64.max() <= 15
    tall = np.abs([sample_shift(rng, (1024, 256)) for _ in range(200)])   # (H, W): dy doubles, dx halves
    assert tall[:, 0].max() <= 60 and tall[:, 1].min() >= 180
    assert sample_shift(np.random.default_rng(5), (64, 64)) == sample_shift(np.random.default_rng(5), (64, 64))


def test_binary_targets_are_moved_masks():
    label = np.zeros((32, 32), np.float32)
    label[4:10, 6:12] = 0.7                       # labeler output; > threshold 0 is foreground
    maker = TargetMaker("binary", threshold=0.0)
    edit = maker.edit(label, (5, 8))
    assert edit.dtype == np.float32 and set(np.unique(edit)) == {0.0, 1.0}
    np.testing.assert_array_equal(np.argwhere(edit), np.argwhere(maker.noop(label)) + [8, 5])
    np.testing.assert_array_equal(maker.random(label), maker.noop(label))


def test_regression_targets_are_rescaled_or_z_scored():
    label = np.tile(np.linspace(1, 3, 16, dtype=np.float32)[:, None], (1, 16))
    maker = TargetMaker("regression", target_norm={"mean": 2.0, "std": 0.5})
    edit = maker.edit(label, (0, 4))
    assert edit.min() == pytest.approx(-9, rel=1e-5) and edit.max() == pytest.approx(9, rel=1e-5)
    assert (edit[:5] == edit[0]).all()                    # uncovered rows repeat the edge
    np.testing.assert_allclose(maker.noop(label), (label - 2.0) / 0.5, rtol=1e-5, atol=1e-6)
    z = TargetMaker("regression", target_norm={"mean": 2.0, "std": 0.5}, value_range=None).edit(label, (0, 4))
    np.testing.assert_allclose(z[4:], ((label - 2.0) / 0.5)[:-4], rtol=1e-5, atol=1e-6)
    assert (rescale(np.ones((3, 3)), (-9, 9)) == 0).all()
    with pytest.raises(ValueError, match="binary"):
        TargetMaker("multiclass")


def test_random_sources():
    labels = [np.full((4, 4), float(k)) for k in range(5)]
    for i in range(5):
        for s in range(20):
            other, shift = random_source("other_image", i, labels, np.random.default_rng(s), (4, 4))
            assert other[0, 0] != i and shift == (0, 0)
    own, shift = random_source("random_shift", 2, labels, np.random.default_rng(0), (512, 512))
    assert own[0, 0] == 2 and min(abs(shift[0]), abs(shift[1])) >= 90
    with pytest.raises(ValueError, match="random_shift"):
        random_source("other_image", 0, labels[:1], np.random.default_rng(0), (4, 4))


def test_offset_paths():
    circle = offset_path("circle", 8, 105.0, (512, 512))
    assert len(circle) == 8 and circle[0] == (105, 0) and circle[2] == (0, 105)
    assert all(abs(np.hypot(*o) - 105) < 1 for o in circle)
    line = offset_path("line", 5, 105.0, (64, 64))
    assert line[0] == (-13, 0) and line[-1] == (13, 0) and line[2] == (0, 0)
    with pytest.raises(ValueError, match="circle"):
        offset_path("spiral", 4, 10.0, (64, 64))
