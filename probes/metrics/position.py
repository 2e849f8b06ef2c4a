"""The position-only baseline: the best linear map from pixel coordinates to the label.

A probe that "finds depth" may only have learnt that depth grows with image height, or that
objects sit in the middle of the frame. This baseline knows nothing but where a pixel is: the
least-squares fit of the (z-scored, or ``2f - 1`` for binary) train labels on ``(1, x, y)``.
Since every image shares the same coordinates, that fit is the fit to the mean train label map.
It is scored on the test split with the probes' own metrics, under the pseudo-layer
``position``, at every step (it does not depend on the step), so plots draw it as a flat line
and reports can say by how much a probe beats it.
"""
from __future__ import annotations

import numpy as np
import torch

from probes.metrics.baseline_rows import POSITION
from probes.metrics.exact import BlockTargets, HeadMetrics, task_scores
from probes.tasks import get_task

__all__ = ["POSITION", "coordinate_features", "fit_position_map", "position_rows"]


def coordinate_features(height: int, width: int) -> torch.Tensor:
    """``[H*W, 3]``: a constant and the pixel-centre coordinates in ``[-0.5, 0.5]``."""
    y, x = torch.meshgrid((torch.arange(height, dtype=torch.float64) + 0.5) / height - 0.5,
                          (torch.arange(width, dtype=torch.float64) + 0.5) / width - 0.5, indexing="ij")
    return torch.stack([torch.ones_like(x), x, y], -1).reshape(-1, 3)


def fit_position_map(mean_target: torch.Tensor) -> torch.Tensor:
    """The least-squares ``(1, x, y)`` fit of a ``[H, W]`` map, evaluated at every pixel (``[H*W]``)."""
    h, w = mean_target.shape
    x = coordinate_features(h, w)
    coef = torch.linalg.lstsq(x, mean_target.reshape(-1, 1).to(torch.float64)).solution
    return (x @ coef)[:, 0]


def _targets(module, task, labels, idx: list[int]) -> torch.Tensor:
    raw = torch.from_numpy(np.stack([np.asarray(labels[i]) for i in idx]))
    y = module.targets(task, raw).to(torch.float64)
    return 2 * y - 1 if task.kind == "binary" else y


@torch.no_grad()
def position_rows(module, dm, split: str = "test", chunk: int = 8) -> list[dict]:
    """Metric rows of the position-only baseline on ``split`` (fitted on the train split)."""
    train, ds = dm.datasets.get("train"), dm.datasets.get(split)
    if train is None or ds is None:
        return []
    spec = module.spec
    h, w = spec.label_size
    rows = []
    for t in module.banks:
        task, labels = get_task(t), dm.label_caches[t].array()
        tr = list(train.indices)
        total = torch.zeros(h, w, dtype=torch.float64)
        for k in range(0, len(tr), chunk):
            total += _targets(module, task, labels, tr[k:k + chunk]).sum(0)
        pred = fit_position_map(total / max(len(tr), 1))                          # [H*W]
        metric = HeadMetrics(list(task.metrics), 1, sync_on_compute=False)        # rank 0 alone
        idx = list(ds.indices)
        for k in range(0, len(idx), chunk):
            sel = idx[k:k + chunk]
            y = module.targets(task, torch.from_numpy(np.stack([np.asarray(labels[i]) for i in sel])))
            q = pred.to(torch.float32).expand(len(sel), 1, h * w)                   # one "token" per pixel
            blocks = BlockTargets.build(y, (h, w), ranks=task.kind != "binary")
            metric.update(task_scores(task, q > 0 if task.kind == "binary" else q, blocks), slice(0, 1))
        values = metric.compute().reshape(len(task.metrics), 1)   # torchmetrics squeezes a [1, 1] result
        for mi, name in enumerate(task.metrics):
            for si, step in enumerate(spec.steps):
                rows.append({"split": split, "task": t, "layer": POSITION, "step": step,
                             "timestep": spec.timesteps[si], "metric": name, "value": float(values[mi, 0])})
    return rows
