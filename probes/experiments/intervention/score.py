"""Scores of an intervention: did the edited image change the way the target asked?

The edited image is re-labelled with the same labeler as the original, and compared with the
condition's own target, with the *requested* target (the edit condition's: the counterfactual the
experiment asks for, also used to score the controls) and with the original label.

Foreground (binary tasks), per image and condition:

- ``dice_*``, ``iou_*``: of the re-labelled mask against the condition's target, the requested
  target and the original mask (both empty -> 1, as the protocol's Dice);
- ``displacement_x``, ``displacement_y``, ``displacement``: the foreground centroid's move in
  pixels, re-labelled edited mask minus original mask (x right, y down);
- ``shift_x``, ``shift_y``: the requested shift s;
- ``progress``: the displacement's projection on the requested direction, in units of the
  requested distance, d·s / |s|²;
- ``success``: ``progress >= 0.5``: the object moved at least half the requested distance in the
  requested direction (a displacement whose projection on s is at least 0.5 |s|). An object that
  vanished (empty re-labelled mask) counts as a failure; an image whose original mask is empty has
  no object to move and is not scored (NaN, left out of the rates).

Dice, IoU and Spearman are the project's own (:mod:`probes.metrics.maps`, the probes' exact
metrics on one-pixel blocks). Regression (depth), per image and condition: ``spearman_target``,
``spearman_requested``, ``spearman_original`` (over all pixels; NaN for a constant map) and ``success`` = the edited depth ranks closer
to the requested target than to the original label (``spearman_requested > spearman_original``).

Every condition also gets ``pixel_mae`` and ``pixel_max``: the edited image's absolute difference
to the original image, in 0-255 units.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from probes.metrics.maps import map_spearman, mask_dice, mask_iou

SUCCESS_FRACTION = 0.5


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) mean pixel position of a mask, ``None`` when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def pixel_difference(image: np.ndarray, original: np.ndarray) -> dict[str, float]:
    """Mean and max absolute difference of two uint8 images, in 0-255 units."""
    d = np.abs(image.astype(np.int16) - original.astype(np.int16))
    return {"pixel_mae": float(d.mean()), "pixel_max": float(d.max())}


def move_scores(original: np.ndarray, edited: np.ndarray, shift: tuple[int, int]) -> dict[str, float]:
    """Centroid displacement of ``edited`` vs ``original`` (masks) against the requested ``shift``."""
    sx, sy = float(shift[0]), float(shift[1])
    out = {"shift_x": sx, "shift_y": sy}
    c0, c1 = centroid(original), centroid(edited)
    norm2 = sx * sx + sy * sy
    if c0 is None or norm2 == 0:
        return {**out, "displacement_x": math.nan, "displacement_y": math.nan, "displacement": math.nan,
                "progress": math.nan, "success": math.nan}
    if c1 is None:    # the object vanished: it did not move as requested
        return {**out, "displacement_x": math.nan, "displacement_y": math.nan, "displacement": math.nan,
                "progress": math.nan, "success": 0.0}
    dx, dy = c1[0] - c0[0], c1[1] - c0[1]
    progress = (dx * sx + dy * sy) / norm2
    return {**out, "displacement_x": dx, "displacement_y": dy, "displacement": math.hypot(dx, dy),
            "progress": progress, "success": float(progress >= SUCCESS_FRACTION)}


def score_foreground(original: np.ndarray, edited: np.ndarray, target: np.ndarray, requested: np.ndarray,
                     shift: tuple[int, int]) -> dict[str, float]:
    """All foreground scores of one edited image (masks, 0/1 or bool, all [H, W])."""
    out = {}
    for name, ref in (("target", target), ("requested", requested), ("original", original)):
        out[f"dice_{name}"], out[f"iou_{name}"] = mask_dice(edited, ref > 0.5), mask_iou(edited, ref > 0.5)
    out["empty"] = float(not edited.any())
    return {**out, **move_scores(original, edited, shift)}


def score_regression(original: np.ndarray, edited: np.ndarray, target: np.ndarray,
                     requested: np.ndarray) -> dict[str, float]:
    """All regression (depth) scores of one edited image (maps [H, W]; units do not matter to ranks)."""
    out = {"spearman_target": map_spearman(edited, target), "spearman_requested": map_spearman(edited, requested),
           "spearman_original": map_spearman(edited, original)}
    r, o = out["spearman_requested"], out["spearman_original"]
    out["success"] = math.nan if math.isnan(r) or math.isnan(o) else float(r > o)
    return out


def aggregate(rows: Iterable[dict]) -> list[dict]:
    """Per-image long rows (split, condition, metric, value, ...) -> per-condition means.

    NaNs (unscored images) are left out of each mean; ``success`` becomes ``success_rate``, and
    ``n_images`` / ``n_scored`` say how many images there were and how many had a success score,
    and ``pixel_max_worst`` is the largest ``pixel_max`` of any image.
    """
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    images: dict[tuple[str, str], set] = defaultdict(set)
    for r in rows:
        groups[(r["split"], r["condition"], r["metric"])].append(float(r["value"]))
        images[(r["split"], r["condition"])].add(r["index"])
    out = []
    for (split, condition), idx in images.items():
        out.append({"split": split, "condition": condition, "metric": "n_images", "value": float(len(idx))})
    for (split, condition, metric), values in groups.items():
        v = np.asarray(values, np.float64)
        v = v[~np.isnan(v)]
        name = "success_rate" if metric == "success" else metric
        out.append({"split": split, "condition": condition, "metric": name,
                    "value": float(v.mean()) if v.size else math.nan})
        if metric == "success":
            out.append({"split": split, "condition": condition, "metric": "n_scored", "value": float(v.size)})
        if metric == "pixel_max":     # the worst image too, not only the mean of per-image maxima
            out.append({"split": split, "condition": condition, "metric": "pixel_max_worst",
                        "value": float(v.max()) if v.size else math.nan})
    return out
