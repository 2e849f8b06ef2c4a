"""The run's position baselines, read from the label caches: a labels-only pass over train, thresholds on val.

Every run reports its own prior map and plane (:mod:`probes.metrics.prior_map`), fitted on its
own train labels, so a control that labels other images is measured against its own baselines.
The probe module owns the fitted baselines: the gain heads (activations + prior) of the SGD bank
need the prior before training starts (this pass), while one-pass ridge probes accumulate the
same mean map in their single pass and only take the thresholds from here.

Maps live in the probes' target space: z-scored values for regression tasks (``module.targets``,
so RMSE is in the probes' z-units) and positive-pixel frequencies for binary tasks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from probes.metrics.position import baseline_scores
from probes.metrics.prior_map import LabelMean, PositionBaseline, baselines_from_mean
from probes.tasks import Task, get_task

#: label maps converted at a time (512x512 float64 maps add up quickly)
CHUNK = 16

Targets = Callable[[Task, torch.Tensor], torch.Tensor]


def split_indices_of(dm: Any, split: str) -> list[int]:
    """The store indices of ``split`` in the data module (empty when it has no such split)."""
    ds = getattr(dm, "datasets", {}).get(split)
    return list(ds.indices) if ds is not None else []


def target_chunks(targets: Targets, task: Task, labels: np.ndarray, indices: Sequence[int],
                  chunk: int = CHUNK) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(indices, targets [n, H, W] float64)`` in chunks: raw labels through the module's ``targets``."""
    idx = list(indices)
    for k in range(0, len(idx), chunk):
        sel = idx[k:k + chunk]
        raw = torch.from_numpy(np.stack([np.asarray(labels[i]) for i in sel]))
        yield sel, targets(task, raw).to(torch.float64).numpy()


def train_mean(targets: Targets, task: Task, labels: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """The per-pixel mean ``[H, W]`` of the train targets (the prior map), in one read of the labels."""
    acc = LabelMean()
    for _, y in target_chunks(targets, task, labels, indices):
        acc.update(y)
    return acc.mean()


def val_masks(targets: Targets, task: Task, labels: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """``[N, H, W]`` bool masks of the split binary tasks' thresholds are picked on (val; train without val)."""
    parts = [y > 0.5 for _, y in target_chunks(targets, task, labels, indices)]
    if not parts:
        raise ValueError(f"task {task.name!r} is binary: its position baselines' thresholds are picked on the "
                         f"validation split, which is empty; set data.prompts.val_fraction > 0")
    return np.concatenate(parts)


def fit_position(targets: Targets, dm: Any, tasks: Sequence[str],
                 means: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, PositionBaseline]]:
    """``{task: {"prior": ..., "plane": ...}}`` from the label caches of ``dm``.

    :param targets: the probe module's ``targets`` (raw labels -> target space).
    :param means: per task, a train mean map already accumulated (one-pass probes); otherwise the
        train labels are read once here.
    """
    train, val = split_indices_of(dm, "train"), split_indices_of(dm, "val")
    out = {}
    for t in tasks:
        task, labels = get_task(t), dm.label_caches[t].array()
        mean = (means or {}).get(t)
        if mean is None:
            if not train:
                raise ValueError("the position baselines are fitted on the train split, which is empty")
            mean = train_mean(targets, task, labels, train)
        # thresholds on val; a run without val (nothing is selected there) fits them on train, like the map
        masks = val_masks(targets, task, labels, val or train) if task.kind == "binary" else None
        out[t] = baselines_from_mean(mean, masks, binary=task.kind == "binary")
    return out


def position_scores(targets: Targets, dm: Any, position: dict[str, dict[str, PositionBaseline]],
                    split: str) -> tuple[list[int], dict[str, dict[str, np.ndarray]]]:
    """Per-image scores of every baseline on ``split``: ``(indices, {task: {name: [N, M]}})``."""
    idx = split_indices_of(dm, split)
    out: dict[str, dict[str, np.ndarray]] = {}
    for t, baselines in position.items():
        task, labels = get_task(t), dm.label_caches[t].array()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in baselines}
        for _, y in target_chunks(targets, task, labels, idx):
            for name, b in baselines.items():
                parts[name].append(baseline_scores(b, task, y))
        out[t] = {name: np.concatenate(p) if p else np.zeros((0, len(task.metrics))) for name, p in parts.items()}
    return idx, out
