"""Bootstrap intervals: scipy's numbers, paired resampling, degenerate inputs, and the words printed."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from probes.metrics.bootstrap import Interval, difference_interval, format_interval, mean_interval


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_interval_is_scipy_with_the_same_seed(method):
    x = np.random.default_rng(0).normal(0.8, 0.1, size=40)
    iv = mean_interval(x, resamples=2000, method=method, seed=7)
    ref = bootstrap((x,), np.mean, n_resamples=2000, method=method, rng=np.random.default_rng(7)).confidence_interval
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    assert iv.estimate == pytest.approx(x.mean()) and iv.n == 40 and iv.resamples == 2000 and iv.method == method


def test_difference_interval_is_scipy_paired():
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.2, size=30)
    probe = base + rng.normal(0.05, 0.02, size=30)              # better on every image, by a little
    iv = difference_interval(probe, base, resamples=3000, seed=3)
    ref = bootstrap((probe, base), lambda a, b, axis: a.mean(axis) - b.mean(axis), paired=True, vectorized=True,
                    n_resamples=3000, method="percentile", rng=np.random.default_rng(3)).confidence_interval
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    assert iv.distinguishable and iv.low > 0
    # unpaired, the image-to-image spread (0.2) would swamp the 0.05 difference
    unpaired = bootstrap((probe, base), lambda a, b, axis: a.mean(axis) - b.mean(axis), n_resamples=3000,
                         method="percentile", rng=np.random.default_rng(3)).confidence_interval
    assert unpaired.low < 0 < iv.low


def test_degenerate_inputs_give_a_point_or_a_clear_error():
    same = mean_interval(np.full(5, 0.7), method="bca")
    assert (same.low, same.estimate, same.high) == (0.7, 0.7, 0.7)
    tie = difference_interval(np.full(4, 0.5), np.full(4, 0.5))
    assert tie.estimate == 0.0 and not tie.distinguishable
    shifted = difference_interval(np.arange(4.0) + 0.1, np.arange(4.0))   # the same gain on every image
    assert shifted.low == shifted.high == shifted.estimate == pytest.approx(0.1) and shifted.distinguishable
    with pytest.raises(ValueError, match="at least 2 images, got n=1"):
        mean_interval(np.array([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        mean_interval(np.array([0.5, np.nan, 0.2]))
    with pytest.raises(ValueError, match=">= 1000"):
        mean_interval(np.arange(5.0), resamples=100)
    with pytest.raises(ValueError, match="one value per image"):
        difference_interval(np.arange(5.0), np.arange(4.0))


def test_the_same_seed_gives_the_same_interval():
    x = np.random.default_rng(2).random(25)
    assert mean_interval(x, seed=5) == mean_interval(x, seed=5)


def test_format_says_not_distinguishable_when_the_interval_contains_zero():
    diff = Interval(0.052, -0.001, 0.093, 64, "percentile", 9999, statistic="difference")
    assert format_interval(diff) == "+0.052 [-0.001, +0.093] not distinguishable"
    assert format_interval(Interval(-0.084, -0.097, -0.071, 64, "percentile", 9999, statistic="difference")) == \
        "-0.084 [-0.097, -0.071]"
    assert str(Interval(0.837, 0.788, 0.877, 64, "percentile", 9999)) == "0.837 [0.788, 0.877]"
