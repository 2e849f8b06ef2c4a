"""Paired bootstrap intervals over test images, and how to write them.

With 64 test images a 0.05 difference between two heads can be noise; a number without an
interval invites reading it as a result. Every reported mean score and every difference of paired
per-image scores (probe − baseline, probe − control, gain over position) therefore gets a 95 %
bootstrap interval over images, from ``scipy.stats.bootstrap`` (not a hand loop): images are
resampled with replacement, the *same* resample for both members of a pair (``paired=True``), so
the interval of a difference reflects how consistently one beats the other image by image.

A fixed seed makes reports reproducible; percentile intervals are the default (they never fail on
skewed or degenerate data), BCa is available. A difference whose interval contains 0 is written
"not distinguishable", so no table can present noise as a finding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

METHODS = ("percentile", "bca", "basic")
MIN_RESAMPLES = 1000
DEFAULT_RESAMPLES = 9999     # scipy's default
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A statistic over test images with its bootstrap confidence interval.

    :param statistic: ``mean`` (of one score) or ``difference`` (mean of paired differences).
    """

    estimate: float
    low: float
    high: float
    n: int
    method: str
    resamples: int
    confidence: float = 0.95
    statistic: str = "mean"

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes 0 (for a difference: the two are told apart)."""
        return not (self.low <= 0.0 <= self.high)

    def __str__(self) -> str:
        return format_interval(self)


def format_interval(iv: Interval, digits: int = 3) -> str:
    """``0.837 [0.788, 0.877]``; a difference is signed, ``+0.052 [-0.001, +0.093] not distinguishable``."""
    sign = "+" if iv.statistic == "difference" else ""

    def f(v: float) -> str:
        if v != v:
            return "nan"
        v = 0.0 if abs(v) < 0.5 * 10 ** -digits else v     # no "-0.000"
        return f"{v:{sign}.{digits}f}"

    text = f"{f(iv.estimate)} [{f(iv.low)}, {f(iv.high)}]"
    return text if iv.distinguishable else f"{text} not distinguishable"


def _check(x: np.ndarray, what: str, resamples: int, method: str, confidence: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples={resamples} is too few for a stable 95 % interval; use >= {MIN_RESAMPLES}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if x.ndim != 1:
        raise ValueError(f"{what} must be one score per image ([n]), got shape {x.shape}")
    if x.size < 2:
        raise ValueError(f"{what}: a bootstrap over images needs at least 2 images, got n={x.size}; "
                         f"score more test images")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} of {x.size} per-image scores are NaN/inf; "
                         f"drop or fix those images before the interval")


def _interval(data: tuple[np.ndarray, ...], statistic, estimate: float, kind: str, resamples: int, method: str,
              seed: int, confidence: float) -> Interval:
    n = data[0].size
    spread = np.ptp(data[0] - data[1]) if kind == "difference" else np.ptp(data[0])
    if spread <= 1e-12 * max(1.0, float(np.abs(data[0]).max())):
        # every resample gives the same value (up to rounding): the interval is that point (scipy's
        # BCa would give NaN)
        return Interval(estimate, estimate, estimate, n, method, resamples, confidence, kind)
    res = bootstrap(data, statistic, n_resamples=resamples, paired=len(data) > 1, vectorized=True,
                    confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), n, method, resamples, confidence, kind)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def mean_interval(scores: np.ndarray, resamples: int = DEFAULT_RESAMPLES, method: str = "percentile",
                  seed: int = DEFAULT_SEED, confidence: float = 0.95) -> Interval:
    """The mean of per-image ``scores`` ``[n]`` with its bootstrap interval over images."""
    x = np.asarray(scores, dtype=np.float64)
    _check(x, "scores", resamples, method, confidence)
    return _interval((x,), _mean, float(x.mean()), "mean", resamples, method, seed, confidence)


def difference_interval(a: np.ndarray, b: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                        method: str = "percentile", seed: int = DEFAULT_SEED, confidence: float = 0.95) -> Interval:
    """``mean(a) − mean(b)`` for per-image scores of the *same* images (paired resampling).

    :param a: e.g. the probe's per-image scores ``[n]``.
    :param b: e.g. the baseline's (or control's) on the same images, in the same order.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check(x, "a", resamples, method, confidence)
    _check(y, "b", resamples, method, confidence)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need one value per image on both sides; got {x.size} and {y.size} images")
    return _interval((x, y), _mean_difference, float(x.mean() - y.mean()), "difference", resamples, method, seed,
                     confidence)
