"""Per-image scores at label resolution: scipy's definitions, the protocol's Dice, and aligned depth by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from probes.metrics.image_scores import aligned_depth_metrics, dice, pearson, rmse, scale_shift, spearman


def test_correlations_match_scipy_per_image_with_ties():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(19, 6, 7)).astype(np.float64)    # many ties; more images than one chunk
    label = rng.normal(size=(19, 6, 7)).round(1)
    for i in range(19):
        assert spearman(pred, label)[i] == pytest.approx(spearmanr(pred[i].ravel(), label[i].ravel())[0], abs=1e-12)
        assert pearson(pred, label)[i] == pytest.approx(pearsonr(pred[i].ravel(), label[i].ravel())[0], abs=1e-12)
    np.testing.assert_allclose(rmse(pred, label), np.sqrt(((pred - label) ** 2).mean((1, 2))))


def test_a_constant_map_has_no_correlation_rather_than_nan():
    label = np.random.default_rng(1).normal(size=(2, 4, 4))
    flat = np.ones_like(label)
    assert spearman(flat, label).tolist() == [0.0, 0.0]
    assert pearson(flat, label).tolist() == [0.0, 0.0]


def test_dice_follows_the_protocol_including_empty_vs_empty():
    t = np.zeros((3, 4, 4), bool)
    p = np.zeros((3, 4, 4), bool)
    t[1, :2] = True                  # 8 pixels
    p[1, :1] = True                  # 4 pixels, all inside
    t[2, 0, 0] = True                # a label the prediction misses
    d = dice(p, t)
    assert d[0] == 1.0                                        # both empty
    assert d[1] == pytest.approx(2 * 4 / (4 + 8), abs=1e-6)
    assert d[2] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="boolean mask"):
        dice(p.astype(float) * 0.5, t)


def test_dice_matches_the_block_formula_of_exact_py_on_upsampled_tokens():
    from probes.metrics.exact import BlockTargets
    from probes.metrics.exact import dice as block_dice
    from probes.metrics.exact import spearman as block_spearman

    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(3, 16))                               # 4x4 tokens, 4x4 pixels each
    label = rng.normal(size=(3, 16, 16))
    up = np.kron(tokens.reshape(3, 4, 4), np.ones((4, 4)))
    blocks = BlockTargets.build(torch.from_numpy(label), (4, 4))
    np.testing.assert_allclose(block_spearman(torch.from_numpy(tokens)[:, None], blocks)[:, 0].numpy(),
                               spearman(up, label), atol=1e-10)
    mask_blocks = BlockTargets.build(torch.from_numpy((label > 0).astype(np.float64)), (4, 4), ranks=False)
    np.testing.assert_allclose(block_dice(torch.from_numpy(tokens > 0)[:, None], mask_blocks)[:, 0].numpy(),
                               dice(up > 0, label > 0), atol=1e-10)


def test_scale_shift_recovers_an_affine_map():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(2, 5, 5))
    s, t = scale_shift(pred, 3.0 * pred - 2.0)
    np.testing.assert_allclose(s, 3.0)
    np.testing.assert_allclose(t, -2.0)


def test_aligned_depth_metrics_by_hand_in_depth_space():
    # depths 1, 2, 4, 8; prediction 0, 1, 1, 2: least squares gives s = 7/2, t = 1/4,
    # aligned 1/4, 15/4, 15/4, 29/4; errors -3/4, 7/4, -1/4, -3/4; ratios 4, 15/8, 16/15, 32/29
    label = np.array([[[1.0, 2.0], [4.0, 8.0]]])
    pred = np.array([[[0.0, 1.0], [1.0, 2.0]]])
    s, t = scale_shift(pred, label)
    assert (s[0], t[0]) == (pytest.approx(7 / 2), pytest.approx(1 / 4))
    m = aligned_depth_metrics(pred, label, space="depth")
    assert m.abs_rel[0] == pytest.approx((3 / 4 + 7 / 8 + 1 / 16 + 3 / 32) / 4)
    assert m.rmse[0] == pytest.approx(np.sqrt(17) / 4)
    assert m.delta1[0] == 0.5
    assert m.valid_fraction[0] == 1.0


def test_aligned_depth_metrics_by_hand_in_inverse_depth_space():
    # inverse depths 8, 4, 2, 1 (depths 1/8 .. 1); prediction 2, 1, 1, 0: fitted in inverse depth,
    # s = 7/2, t = 1/4: 29/4, 15/4, 15/4, 1/4; the last is clamped at the farthest label (1), so the
    # predicted depths are 4/29, 4/15, 4/15, 1: ratios 32/29, 16/15, 15/8, 1
    label = np.array([[[8.0, 4.0], [2.0, 1.0]]])
    pred = np.array([[[2.0, 1.0], [1.0, 0.0]]])
    m = aligned_depth_metrics(pred, label, space="inverse_depth")
    assert m.abs_rel[0] == pytest.approx((3 / 29 + 1 / 15 + 7 / 15 + 0) / 4)
    err = np.array([4 / 29 - 1 / 8, 4 / 15 - 1 / 4, 4 / 15 - 1 / 2, 0.0])
    assert m.rmse[0] == pytest.approx(np.sqrt(np.mean(err ** 2)))
    assert m.delta1[0] == 0.75
    # a cap farther than every label leaves the last pixel unclamped at depth 4: ratio 4, outside 1.25
    assert aligned_depth_metrics(pred, label, space="inverse_depth", depth_cap=10.0).delta1[0] == 0.5
    # a prediction affine in the label is perfect whatever its units
    perfect = aligned_depth_metrics(-3 * label + 5, label, space="inverse_depth")
    assert perfect.abs_rel[0] == pytest.approx(0.0, abs=1e-12) and perfect.delta1[0] == 1.0


def test_aligned_metrics_of_many_images_are_those_of_each_image():
    rng = np.random.default_rng(4)
    label = rng.uniform(0.5, 3.0, size=(11, 5, 5))
    pred = label + rng.normal(scale=0.5, size=label.shape)
    together = aligned_depth_metrics(pred, label)
    for i in (0, 8, 10):
        alone = aligned_depth_metrics(pred[i:i + 1], label[i:i + 1])
        assert (together.abs_rel[i], together.delta1[i]) == (alone.abs_rel[0], alone.delta1[0])


def test_pixels_with_non_positive_labels_are_not_scored_and_bad_arguments_are_named():
    label = np.array([[[0.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]])
    pred = label.copy()
    m = aligned_depth_metrics(pred, label, space="depth")
    assert m.valid_fraction.tolist() == [0.75, 0.25]
    assert m.abs_rel[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(m.abs_rel[1])                                      # one valid pixel: nothing to fit
    with pytest.raises(ValueError, match="space"):
        aligned_depth_metrics(pred, label, space="disparity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal"):
        pearson(pred, label[:1])
