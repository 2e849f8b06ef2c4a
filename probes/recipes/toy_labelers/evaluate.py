"""How good the toy labelers are: their scores on renders they never saw, against the exact truth.

The scores use the project's one Dice and Spearman (:mod:`probes.metrics.maps`), so "foreground
Dice 0.996" here means what a probe's Dice means.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probes.labels.toy_nets import MIN_VISIBLE_PIXELS, predict
from probes.metrics.maps import dice_per_image, spearman_per_image
from probes.toy.world import SHAPES, render_many, scene_for


def present_classes(classes: np.ndarray) -> np.ndarray:
    """[N, H, W] class maps -> [N, 4] 0/1: which shapes at least MIN_VISIBLE_PIXELS show."""
    counts = np.stack([(classes == k).sum((1, 2)) for k in range(len(SHAPES))], 1)
    return (counts >= MIN_VISIBLE_PIXELS).astype(np.float32)


def tie_ceiling(true: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-image Spearman of the truth against itself with ties broken at random.

    Why: a directional light shades the flat ground and the wall uniformly, so half an image's
    true shading is one tied value. Any predictor whose output is not exactly constant there
    breaks the tie, and Spearman then cannot reach 1 even for an almost perfect prediction; this
    is the score of the truth plus an invisible (1e-9) jitter, i.e. the metric's ceiling.
    """
    jitter = np.random.default_rng(seed).normal(0.0, 1e-9, true.shape)
    return spearman_per_image(true.astype(np.float64) + jitter, true)


@dataclass(frozen=True)
class Scores:
    foreground_dice: float
    depth_spearman: float
    shading_spearman: float
    shading_spearman_objects: float     # over foreground pixels only
    depth_spearman_tie_ceiling: float   # see tie_ceiling: what jittered truth itself scores
    shading_spearman_tie_ceiling: float
    classifier_top1_in_caption: float   # the downstream score: is the top class one the caption names?
    classifier_label_accuracy: float    # per (image, shape) decision at 0.5 vs visible shapes
    classifier_exact_match: float       # the whole set of visible shapes right
    n_images: int
    seed: int
    world: str = "v1"
    images: str = "renders"             # what the labelers saw: the renders, or e.g. their VAE reconstructions


EVAL_FIELDS = ("rgb", "foreground", "inv_depth", "shading", "classes")


def score(rgb: np.ndarray, truth: dict[str, np.ndarray], named: np.ndarray,
          weights_dir: Path | None = None, seed: int = -1, world: str = "v1",
          images: str = "renders") -> Scores:
    """Per-image mean scores of the labelers on ``rgb`` against exact labels ``truth`` (the
    renders' ``foreground``, ``inv_depth``, ``shading``, ``classes``); ``named`` [N, 4] marks the
    shapes each caption names. ``rgb`` may differ from the renders (e.g. VAE reconstructions):
    the labels are still the scene's."""
    n = len(rgb)
    fg = predict("foreground", rgb, weights_dir)
    depth = predict("depth", rgb, weights_dir)
    shading = predict("shading", rgb, weights_dir)
    probs = predict("classifier", rgb, weights_dir)
    visible = present_classes(truth["classes"])
    decided = probs >= 0.5
    return Scores(
        foreground_dice=float(dice_per_image(fg >= 0.5, truth["foreground"]).mean()),
        depth_spearman=float(np.nanmean(spearman_per_image(depth, truth["inv_depth"]))),
        shading_spearman=float(np.nanmean(spearman_per_image(shading, truth["shading"]))),
        shading_spearman_objects=float(np.nanmean(spearman_per_image(
            shading, truth["shading"], truth["foreground"]))),
        depth_spearman_tie_ceiling=float(np.nanmean(tie_ceiling(truth["inv_depth"]))),
        shading_spearman_tie_ceiling=float(np.nanmean(tie_ceiling(truth["shading"]))),
        classifier_top1_in_caption=float(named[np.arange(n), probs.argmax(1)].mean()),
        classifier_label_accuracy=float((decided == visible.astype(bool)).mean()),
        classifier_exact_match=float((decided == visible.astype(bool)).all(1).mean()),
        n_images=n, seed=seed, world=world, images=images)


def named_shapes(seed: int, n: int, world: str = "v1") -> np.ndarray:
    """[n, 4] 0/1: the shapes the caption of ``scene_for(seed, i, world=world)`` names."""
    named = np.zeros((n, len(SHAPES)), np.float32)
    for i in range(n):
        for obj in scene_for(seed, i, world=world).objects:
            named[i, SHAPES.index(obj.shape)] = 1.0
    return named


def evaluate(weights_dir: Path | None = None, n: int = 512, seed: int = 20_231_108,
             world: str = "v1", transform: Callable[[np.ndarray], np.ndarray] | None = None,
             images: str = "renders") -> Scores:
    """Score the labelers on renders they never saw (``seed`` differs from training's).

    ``transform`` (uint8 NHWC -> uint8 NHWC, e.g. a VAE round trip) changes what the labelers see
    while the labels stay the scenes' exact ones; ``images`` names it in the scores.
    """
    data = render_many(n, seed, fields=EVAL_FIELDS, world=world)
    rgb = data["rgb"] if transform is None else transform(data["rgb"])
    return score(rgb, data, named_shapes(seed, n, world), weights_dir, seed, world, images)
