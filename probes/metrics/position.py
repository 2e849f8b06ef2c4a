"""The position baselines scored like probes: per image, with the probes' metrics, in their target space.

:mod:`probes.metrics.prior_map` fits the baselines (the prior map, and the plane kept as a weaker
second one); this scores them. A baseline predicts the same map for every image, so it has one
score per image and none per step: ``metrics.csv`` repeats it at every step under the pseudo-layer
``prior`` or ``plane`` so that curves draw it as a flat line. Scores are taken in the space the
probes are scored in (z-scored targets for regression, so RMSE is in the same z-units; 0/1 masks
for binary tasks), with the pixel-level definitions of :mod:`probes.metrics.image_scores`.
"""
from __future__ import annotations

import numpy as np

from probes.metrics.image_scores import SCORES
from probes.metrics.prior_map import PLANE, PRIOR, PositionBaseline
from probes.tasks import Task

__all__ = ["BASELINES", "PLANE", "PRIOR", "baseline_scores"]

#: the position baselines, headline first
BASELINES = (PRIOR, PLANE)


def baseline_scores(baseline: PositionBaseline, task: Task, targets: np.ndarray) -> np.ndarray:
    """Per-image scores ``[N, M]`` (``task.metrics`` order) of ``baseline`` on ``targets [N, H, W]``.

    :param targets: in the baseline's space: z-scored values, or 0/1 masks for a binary task.
    """
    y = np.asarray(targets)
    if y.ndim != 3 or y.shape[1:] != baseline.map.shape:
        raise ValueError(f"targets must be [N, H, W] with H, W = {baseline.map.shape} (the baseline's map); got "
                         f"{y.shape}")
    pred = baseline.predict(y.shape[0])
    if task.kind == "binary":
        if baseline.threshold is None:
            raise ValueError(f"task {task.name!r} is binary but the {baseline.name} baseline has no threshold")
        return SCORES["dice"](pred, y > 0.5)[:, None]
    return np.stack([SCORES[m](pred, y) for m in task.metrics], -1)
