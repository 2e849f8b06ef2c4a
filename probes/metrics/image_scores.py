"""Per-image scores of full-resolution prediction maps: the definitions every other path must match.

Bootstrap intervals, paired differences and the position baselines all need one score *per test
image*, on maps at label resolution (a baseline map is not block-constant, so the token-level
shortcuts of :mod:`probes.metrics.exact` do not apply to it). This module is the plain, pixel-level
statement of each metric; the block formulas of ``exact.py`` are a faster route to the same numbers
for block-constant probe outputs and are tested against these.

Conventions (each one a choice a reader could otherwise get wrong):

- **Dice**: ``(2|P∩T| + eps) / (|P| + |T| + eps)`` with ``eps = 1e-6``, as PROTOCOL.md writes it, so
  an empty prediction on an empty label scores 1 (and an empty prediction on a non-empty label ~0).
- **Pearson / Spearman**: per image over all pixels; Spearman is Pearson on ranks with ties given
  their average rank (``scipy.stats.spearmanr``). A constant map (or label) has no correlation:
  scored 0, where scipy returns NaN, so one flat image does not turn a mean over images into NaN.
- **Aligned depth metrics** (AbsRel, RMSE, δ<1.25): relative depth labels (MiDaS) are defined only
  up to scale and shift, so each prediction is first fitted to its label by least squares
  ``s * pred + t`` over the valid pixels (label > 0), per image, as MiDaS' evaluation and Probe3D's
  ``match_scale_and_shift`` do. ``space`` says what the label *is*, and the fit happens there:

  * ``"depth"`` (Probe3D): fit in depth, score in depth.
  * ``"inverse_depth"`` (MiDaS outputs, relative inverse depth): fit in inverse depth, clamp the
    fitted inverse depth from below (MiDaS' ``disparity_cap``: ``1 / depth_cap``; by default the
    image's smallest valid label value, i.e. nothing farther than the farthest labelled pixel),
    then invert both and score in depth.

  The metrics need a label whose zero means "infinitely far" (inverse depth) or "at the camera"
  (depth): a z-scored label has no such zero, so pass the raw label. The prediction may be in any
  affine units (z-scores are fine): the fit absorbs them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import rankdata

DICE_EPS = 1e-6
DEPTH_SPACES = ("depth", "inverse_depth")


#: images converted to float64 at a time: 512x512 maps of 500 test images would be 1 GB at once
CHUNK = 8


def _check_shapes(pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape != label.shape or pred.ndim != 3:
        raise ValueError(f"predictions and labels must both be [N, H, W] and equal; got {pred.shape} and "
                         f"{label.shape} (upsample token predictions to the label size first)")


def _chunks(pred: np.ndarray, label: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Both as float64 ``[n, H*W]``, ``CHUNK`` images at a time, after checking the shapes agree."""
    pred, label = np.asarray(pred), np.asarray(label)
    _check_shapes(pred, label)
    for i in range(0, pred.shape[0], CHUNK):
        p, y = pred[i:i + CHUNK], label[i:i + CHUNK]
        yield p.reshape(p.shape[0], -1).astype(np.float64), y.reshape(y.shape[0], -1).astype(np.float64)


def _per_image(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    parts = [fn(p, y) for p, y in _chunks(pred, label)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _as_mask(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    values = np.unique(x)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{what} must be a boolean mask (or 0/1); got values such as {values[:5]}: binarise "
                         f"with the task's threshold first (label > threshold)")
    return x.astype(bool)


def _dice_rows(p: np.ndarray, t: np.ndarray, eps: float = DICE_EPS) -> np.ndarray:
    return (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def dice(pred: np.ndarray, label: np.ndarray, eps: float = DICE_EPS) -> np.ndarray:
    """Per-image hard Dice ``[N]`` of masks ``[N, H, W]``; empty vs empty scores 1 (see module doc)."""
    return _per_image(lambda p, t: _dice_rows(p, t, eps), _as_mask(pred, "pred"), _as_mask(label, "label"))


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac = a - a.mean(1, keepdims=True)
    bc = b - b.mean(1, keepdims=True)
    denom = np.sqrt((ac * ac).sum(1) * (bc * bc).sum(1))
    num = (ac * bc).sum(1)
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _row_pearson(rankdata(a, axis=1), rankdata(b, axis=1))


def _row_rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).mean(1))


def pearson(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation ``[N]`` over pixels; 0 for a constant map."""
    return _per_image(_row_pearson, pred, label)


def spearman(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-image Spearman correlation ``[N]`` (ties averaged, as ``scipy.stats.spearmanr``); 0 for a constant map."""
    return _per_image(_row_spearman, pred, label)


def rmse(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-image root-mean-square error ``[N]`` in the units given (z-units for z-scored maps)."""
    return _per_image(_row_rmse, pred, label)


#: the per-image scores a regression or binary task can name (``probes.tasks.Task.metrics``)
SCORES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "dice": dice, "spearman": spearman, "pearson": pearson, "rmse": rmse}


def _fit_scale_shift(p: np.ndarray, y: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = valid.astype(np.float64)
    safe = np.maximum(w.sum(1), 1)
    pm, ym = (w * p).sum(1) / safe, (w * y).sum(1) / safe
    pc = (p - pm[:, None]) * w
    var, cov = (pc * pc).sum(1), (pc * (y - ym[:, None])).sum(1)
    s = np.divide(cov, var, out=np.zeros_like(cov), where=var > 0)
    return s, ym - s * pm


def scale_shift(pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-image least-squares ``(s, t)`` ``[N]`` minimising ``sum_valid (s * pred + t - label)^2``.

    ``valid`` (``[N, H, W]`` bool) defaults to every pixel. A prediction constant over the valid
    pixels cannot be scaled: ``s = 0`` and ``t`` is the mean label (the best constant), rather
    than a division by zero.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    _check_shapes(pred, label)
    n = pred.shape[0]
    p, y = pred.reshape(n, -1).astype(np.float64), label.reshape(n, -1).astype(np.float64)
    v = np.ones_like(p, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(p.shape)
    return _fit_scale_shift(p, y, v)


@dataclass(frozen=True)
class AlignedDepth:
    """Per-image aligned depth metrics, each ``[N]`` (NaN where an image has fewer than 2 valid pixels)."""

    abs_rel: np.ndarray       # mean |d_pred - d| / d over valid pixels (lower is better)
    rmse: np.ndarray          # sqrt(mean (d_pred - d)^2), in the label's depth units (lower is better)
    delta1: np.ndarray        # share of valid pixels with max(d_pred/d, d/d_pred) < 1.25 (higher is better)
    valid_fraction: np.ndarray  # share of pixels with label > 0: the pixels scored


def aligned_depth_metrics(pred: np.ndarray, label: np.ndarray,
                          space: Literal["depth", "inverse_depth"] = "inverse_depth",
                          depth_cap: float | None = None) -> AlignedDepth:
    """AbsRel, RMSE and δ<1.25 after per-image least-squares scale-and-shift alignment (module doc).

    :param pred: ``[N, H, W]`` predictions, any affine units.
    :param label: ``[N, H, W]`` raw labels (not z-scored), depth or inverse depth as ``space`` says;
        pixels with label <= 0 are not scored.
    :param space: what the label is, and so where the alignment is fitted.
    :param depth_cap: ``inverse_depth`` only: the farthest depth a prediction may take (MiDaS'
        cap); default: the image's own farthest labelled depth.
    """
    if space not in DEPTH_SPACES:
        raise ValueError(f"space must be one of {DEPTH_SPACES} (what the label is), got {space!r}")
    if depth_cap is not None and not depth_cap > 0:
        raise ValueError(f"depth_cap must be a positive depth, got {depth_cap!r}")
    parts = [_aligned_rows(p, y, space, depth_cap) for p, y in _chunks(pred, label)]
    cols = [np.concatenate(c) if c else np.zeros(0) for c in zip(*parts)] if parts else [np.zeros(0)] * 4
    return AlignedDepth(*cols)


def _aligned_rows(p: np.ndarray, y: np.ndarray, space: str, depth_cap: float | None) -> tuple[np.ndarray, ...]:
    if not (np.isfinite(p).all() and np.isfinite(y).all()):
        raise ValueError("aligned_depth_metrics: predictions or labels contain NaN/inf; fix them upstream")
    valid = y > 0
    n_valid = valid.sum(1)
    s, t = _fit_scale_shift(p, y, valid)
    aligned = s[:, None] * p + t[:, None]
    if space == "inverse_depth":
        far = np.where(valid, y, np.inf).min(1, keepdims=True)     # inverse depth of the farthest valid pixel
        floor = np.full_like(far, 1.0 / depth_cap) if depth_cap is not None else far
        floor = np.where(np.isfinite(floor), floor, 1.0)           # no valid pixel: masked out below anyway
        d_pred = 1.0 / np.maximum(aligned, floor)
        d_true = np.divide(1.0, y, out=np.ones_like(y), where=valid)
    else:
        d_pred, d_true = aligned, np.where(valid, y, 1.0)
    safe = np.maximum(n_valid, 1)
    abs_rel = (np.abs(d_pred - d_true) / d_true * valid).sum(1) / safe
    err = np.sqrt((((d_pred - d_true) ** 2) * valid).sum(1) / safe)
    ratio = np.maximum(d_true / np.maximum(d_pred, 1e-12), d_pred / d_true)
    ratio = np.where(d_pred > 0, ratio, np.inf)       # a non-positive depth is never within 25 %
    delta1 = ((ratio < 1.25) * valid).sum(1) / safe
    nan = np.where(n_valid < 2, np.nan, 0.0)          # fewer than 2 valid pixels: nothing to fit
    return abs_rel + nan, err + nan, delta1 + nan, n_valid / y.shape[1]
