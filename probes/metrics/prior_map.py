"""Position baselines that are hard to beat: the prior map, and the plane kept as a second one.

A probe that "reads depth" may only have learnt where in the frame things usually are. The
strongest answer that knows nothing but the pixel's position is the **prior map**: the per-pixel
mean of the train labels, at label resolution, predicted for every test image alike. It is the
least-squares optimum among all position-only predictors, so a probe that does not beat it has
shown nothing beyond position. The **plane** (least squares on ``(1, x, y)`` over all train
pixels, which equals the plane fitted to the prior map since every image has the same
coordinates) is kept as a named, weaker second baseline.

For a binary task a map must be thresholded. Thresholding the plane at 0.5 (the old position
baseline's ``2f - 1 > 0``) predicts no object anywhere when objects cover under half of most
pixels' images, a strawman; so both maps get the threshold that scores best **on the validation
split** by the task's metric (Dice by default, found exactly by one sweep over every distinct
cut of the map), never on test.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from probes.metrics.baseline_rows import PLANE, PRIOR
from probes.metrics.image_scores import DICE_EPS

__all__ = ["PLANE", "PRIOR", "LabelMean", "PositionBaseline", "baselines_from_mean", "fit_position_baselines",
           "plane_map", "prior_map"]


class LabelMean:
    """Running per-pixel mean of label maps, fed in batches (a streamed run never holds them all)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, labels: np.ndarray) -> None:
        """Add a batch ``[B, H, W]`` (float labels, or bool masks: the mean is then a frequency)."""
        y = np.asarray(labels, dtype=np.float64)
        if y.ndim != 3:
            raise ValueError(f"labels must be [B, H, W], got shape {y.shape}")
        if not np.isfinite(y).all():
            raise ValueError(f"labels contain {int((~np.isfinite(y)).sum())} NaN/inf values: a mean map would "
                             f"be NaN there; fix the labels upstream")
        if self.total is None:
            self.total = np.zeros(y.shape[1:])
        elif self.total.shape != y.shape[1:]:
            raise ValueError(f"label size {y.shape[1:]} differs from the first batch's {self.total.shape}")
        self.total += y.sum(0)
        self.count += y.shape[0]

    def mean(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no train labels were added: the prior map needs at least one train image")
        return self.total / self.count


def prior_map(train_labels: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """The per-pixel mean ``[H, W]`` of the train labels: one array ``[N, H, W]`` or batches of them."""
    acc = LabelMean()
    batches = [train_labels] if isinstance(train_labels, np.ndarray) else train_labels
    for batch in batches:
        acc.update(batch)
    return acc.mean()


def coordinates(height: int, width: int) -> np.ndarray:
    """``[H*W, 3]``: a constant and the pixel-centre coordinates ``x, y`` in ``[-0.5, 0.5]``."""
    y, x = np.meshgrid((np.arange(height) + 0.5) / height - 0.5, (np.arange(width) + 0.5) / width - 0.5,
                       indexing="ij")
    return np.stack([np.ones(height * width), x.ravel(), y.ravel()], -1)


def plane_map(mean_map: np.ndarray) -> np.ndarray:
    """The least-squares plane ``[H, W]`` in ``(1, x, y)`` through a mean label map.

    Fitting the plane to every train pixel gives the same coefficients as fitting it to their
    per-pixel mean, since all images share the coordinates (the normal equations only see the mean).
    """
    h, w = mean_map.shape
    a = coordinates(h, w)
    coef, *_ = np.linalg.lstsq(a, np.asarray(mean_map, dtype=np.float64).ravel(), rcond=None)
    return (a @ coef).reshape(h, w)


def best_dice_threshold(score_map: np.ndarray, val_masks: np.ndarray, eps: float = DICE_EPS) -> tuple[float, float]:
    """The threshold ``τ`` (positive where ``map > τ``) with the best mean Dice on ``val_masks``, and that Dice.

    Exact over every distinct cut: pixels sorted by map value, the positive set of a cut is a
    prefix, and each image's intersection is a cumulative sum, so all cuts cost one pass per image.
    Ties between cuts go to the higher threshold (fewer positives). ``τ`` lies midway between the
    map's values on either side of the cut (no pixel equals it); ``-inf`` when every pixel is positive.
    """
    v = np.asarray(score_map, dtype=np.float64).ravel()
    masks = np.asarray(val_masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != score_map.shape or masks.shape[0] == 0:
        raise ValueError(f"val masks must be [N>0, H, W] with H, W = {score_map.shape}; got {masks.shape}")
    order = np.argsort(-v, kind="stable")
    vs = v[order]
    k = np.arange(v.size + 1)                                   # k pixels predicted positive
    cut_ok = np.ones(v.size + 1, dtype=bool)
    cut_ok[1:-1] = vs[:-1] > vs[1:]                             # a cut must not split tied values
    total = np.zeros(v.size + 1)
    for m in masks.reshape(masks.shape[0], -1):
        inter = np.concatenate([[0.0], np.cumsum(m[order], dtype=np.float64)])
        total += (2 * inter + eps) / (k + m.sum() + eps)
    mean = np.where(cut_ok, total / masks.shape[0], -np.inf)
    best = int(np.argmax(mean))
    # map > tau keeps exactly the top `best` pixels for any tau in [vs[best], vs[best-1]): the middle of that gap,
    # so that no pixel sits *on* the cut (a head adding a tiny term to the map must not flip it)
    if best == v.size:
        tau = -np.inf
    elif best == 0:
        tau = float(vs[0]) + max(1.0, abs(float(vs[0])))
    else:
        tau = float((vs[best] + vs[best - 1]) / 2)
    return tau, float(mean[best])


def best_threshold(score_map: np.ndarray, val_masks: np.ndarray,
                   score: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                   candidates: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold best on validation by ``score`` (per-image scores, higher is better).

    ``score=None`` is Dice, solved exactly by :func:`best_dice_threshold`. Another metric is
    tried on ``candidates`` (default: 101 quantiles of the map).
    """
    if score is None:
        return best_dice_threshold(score_map, val_masks)
    masks = np.asarray(val_masks, dtype=bool)
    cand = np.quantile(score_map, np.linspace(0, 1, 101)) if candidates is None else np.asarray(candidates)
    means = [float(np.mean(score(np.broadcast_to(score_map > c, masks.shape), masks))) for c in cand]
    best = int(np.argmax(means))
    return float(cand[best]), means[best]


@dataclass(frozen=True)
class PositionBaseline:
    """A position-only predictor: the same map for every image (thresholded for binary tasks)."""

    name: str                  # PRIOR or PLANE: the pseudo-layer it is reported under
    map: np.ndarray            # [H, W] in label units (a frequency for binary tasks)
    threshold: float | None    # binary: positive where map > threshold (picked on val); None: regression
    val_score: float | None = None   # the val score the threshold was picked with

    def predict(self, n: int) -> np.ndarray:
        """``[n, H, W]`` predictions (a read-only broadcast view: no copy per image)."""
        out = self.map if self.threshold is None else self.map > self.threshold
        return np.broadcast_to(out, (n, *self.map.shape))


def fit_position_baselines(train_labels: np.ndarray | Iterable[np.ndarray], val_labels: np.ndarray | None = None,
                           binary: bool = False) -> dict[str, PositionBaseline]:
    """The prior map and the plane, fitted on train; for a binary task, thresholds picked on val.

    :param train_labels: ``[N, H, W]`` train labels (or batches), in the space they are scored
        in; binary tasks pass masks (``label > threshold``).
    :param val_labels: ``[N, H, W]`` validation masks; required for binary tasks (the threshold
        is chosen there; the test split is never an argument here).
    """
    return baselines_from_mean(prior_map(train_labels), val_labels, binary)


def baselines_from_mean(mean: np.ndarray, val_labels: np.ndarray | None = None,
                        binary: bool = False) -> dict[str, PositionBaseline]:
    """:func:`fit_position_baselines` from the train labels' mean map ``[H, W]`` (a one-pass fit
    accumulates it: the map, the plane and the thresholds then need no second read of train)."""
    mean = np.asarray(mean, dtype=np.float64)
    maps = {PRIOR: mean, PLANE: plane_map(mean)}
    if not binary:
        return {name: PositionBaseline(name, m, None) for name, m in maps.items()}
    if val_labels is None:
        raise ValueError("a binary task's baseline threshold is picked on the validation split: pass val_labels "
                         "(never the test labels)")
    out = {}
    for name, m in maps.items():
        tau, val = best_threshold(m, val_labels)
        out[name] = PositionBaseline(name, m, tau, val)
    return out

