"""Heads on top of the prior map, scored at pixel level: the same numbers as the plain per-image definitions
(image_scores) on the upsampled maps, also with each head's own prior weight; and per-image scores round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.metrics.image_scores import dice, pearson, rmse, spearman
from probes.metrics.offset_heads import offset_head_scores, offset_maps
from probes.metrics.per_image import PerImageScores, align
from probes.tasks import get_task


@pytest.mark.parametrize("scale", [None, torch.tensor([1.0, 0.5, -2.0, 0.0, 3.0])])
def test_regression_scores_are_the_pixel_level_definitions(scale):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 16, generator=g)
    offset = torch.randn(8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 8, 8, generator=g)
    y[0, :4] = 0.5                                                  # ties in the target
    got = offset_head_scores(get_task("depth"), q, (4, 4), offset, y, scale)
    maps = offset_maps(q, (4, 4), offset, scale).reshape(3, 5, 8, 8).numpy()
    for k in range(5):
        want = np.stack([spearman(maps[:, k], y.numpy()), pearson(maps[:, k], y.numpy()), rmse(maps[:, k], y.numpy())], -1)
        np.testing.assert_allclose(got[:, k].numpy(), want, rtol=1e-9, atol=1e-12)


def test_binary_heads_are_positive_where_the_sum_is_and_zero_weights_are_the_prior():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, generator=g)
    prior = torch.rand(6, 6, generator=g, dtype=torch.float64)
    tau = float(prior.median())
    mask = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    got = offset_head_scores(get_task("foreground"), q, (2, 2), prior - tau, mask, torch.tensor([1.0, 2.0, 0.5]))
    maps = offset_maps(q, (2, 2), prior - tau, torch.tensor([1.0, 2.0, 0.5])).reshape(2, 3, 6, 6).numpy()
    for k in range(3):
        np.testing.assert_allclose(got[:, k, 0].numpy(), dice(maps[:, k] > 0, mask.numpy() > 0.5))
    zero = offset_head_scores(get_task("foreground"), torch.zeros(2, 1, 4), (2, 2), prior - tau, mask)
    np.testing.assert_allclose(zero[:, 0, 0].numpy(), dice(np.broadcast_to(prior.numpy() > tau, (2, 6, 6)),
                                                           mask.numpy() > 0.5))


def test_per_image_scores_round_trip_and_pair_runs_by_index(tmp_path):
    rng = np.random.default_rng(0)
    a = PerImageScores(np.array([3, 5, 9]), ["up3.0"], [0, 1], {"depth": ["spearman", "rmse"]},
                       {"depth/probe": rng.normal(size=(2, 1, 2, 3)), "depth/prior": rng.normal(size=(2, 3)),
                        "depth/aligned/probe": rng.normal(size=(3, 3))}, {"aligned_heads": {"depth": {"probe": ["up3.0", 1]}}})
    b = PerImageScores.load(a.save(tmp_path / "per_image.npz"))
    assert b.layers == a.layers and b.steps == a.steps and b.info == a.info
    np.testing.assert_array_equal(b.head("depth", "rmse", "up3.0", 1), a.arrays["depth/probe"][1, 0, 1])
    np.testing.assert_array_equal(b.baseline("depth", "spearman", "prior"), a.arrays["depth/prior"][0])
    assert set(b.aligned("depth", "probe")) == {"abs_rel", "rmse", "delta1"}
    c = PerImageScores(np.array([5, 9, 11]), ["up3.0"], [0, 1], {"depth": ["spearman", "rmse"]})
    ia, ic = align(a, c)
    assert a.index[ia].tolist() == c.index[ic].tolist() == [5, 9]
    with pytest.raises(ValueError, match="images"):
        PerImageScores(np.array([1, 2]), [], [], {}, {"x/prior": np.zeros((1, 3))})
