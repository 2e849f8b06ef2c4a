"""Scores of whole maps and masks, pixel by pixel: the per-image metrics of :mod:`.exact` on a grid
of one pixel per block.

Why not a second implementation: the probes' Dice and Spearman (:mod:`.exact`) are exact for any
token grid, so a map scored pixel by pixel is the case of blocks of one pixel. The intervention
(a re-labelled edit against its target) and the toy labelers' evaluation (a prediction against the
renderer's truth) score through these wrappers, so a number called "Dice" or "Spearman" means the
same thing everywhere in the project (ties averaged as ``scipy.stats.rankdata``; both-empty masks
have Dice 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from probes.metrics.exact import BlockTargets, dice, spearman


def _rows(x: np.ndarray, n: int) -> torch.Tensor:
    """``n`` maps of any shape as ``[n, 1, pixels]`` float64: as targets, ``n`` maps of one row of
    one-pixel blocks; as predictions, one head per image over those blocks."""
    return torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(n, 1, -1))


def dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Hard Dice of masks ``[N, H, W]`` (anything > 0.5 is foreground; bool works), one per image;
    1 when both are empty."""
    pred, true = np.asarray(pred), np.asarray(true)
    n = len(pred)
    y = _rows(true > 0.5, n)
    blocks = BlockTargets.build(y, (1, y.shape[-1]), ranks=False)
    return dice(_rows(pred > 0.5, n), blocks)[:, 0].numpy()      # one head (K = 1) per image


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Hard Dice of two masks (0/1 or bool); both empty -> 1."""
    return float(dice_per_image(np.asarray(a)[None], np.asarray(b)[None])[0])


def mask_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Intersection over union of two masks; both empty -> 1 (the smoothing Dice uses)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return float(((a & b).sum() + eps) / ((a | b).sum() + eps))


def map_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho over all pixels of two maps; NaN when either map is constant (no ranking)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    y = _rows(b, 1)
    blocks = BlockTargets.build(y, (1, y.shape[-1]), ranks=True)
    return float(spearman(_rows(a, 1), blocks)[0, 0])


def spearman_per_image(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None,
                       min_pixels: int = 3) -> np.ndarray:
    """Per-image Spearman over all pixels (or the pixels of ``mask``); NaN where fewer than
    ``min_pixels`` are selected or a map is constant there."""
    out = []
    for i, (p, t) in enumerate(zip(pred, true)):
        sel = np.ones(np.shape(p), bool) if mask is None else np.asarray(mask[i], bool)
        out.append(map_spearman(np.asarray(p)[sel], np.asarray(t)[sel]) if sel.sum() >= min_pixels else math.nan)
    return np.array(out)
