"""Collecting per-image test scores while testing, and gathering them from every rank.

The probe module appends, per test batch, the batch's store indices and arrays whose first axis is
the image and last axis the metric (``[B, L, S, M]`` for a bank, ``[B, 3]`` for aligned depth
metrics). At the end of testing they are concatenated, gathered from every rank (the test shards
are disjoint), ordered by store index and turned metric-first, image-last: the layout of
:class:`probes.metrics.per_image.PerImageScores`.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from probes.metrics.per_image import PerImageScores

PerImage = PerImageScores


class PerImageParts:
    """Per-batch pieces of per-image scores (see the module docstring)."""

    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.parts: dict[str, list[np.ndarray]] = defaultdict(list)

    def add_index(self, index: Tensor | np.ndarray) -> None:
        self.index.append(np.asarray(torch.as_tensor(index).cpu()).reshape(-1).astype(np.int64))

    def add(self, key: str, values: Tensor | np.ndarray) -> None:
        v = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        self.parts[key].append(v.astype(np.float64))

    def __bool__(self) -> bool:
        return bool(self.index)

    def local(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        return index, {k: np.concatenate(v) for k, v in self.parts.items()}


def all_ranks(obj):
    """Every rank's ``obj`` (a list of one element without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_per_image(parts: PerImageParts, layers: list[str], steps: list[int],
                     metrics: dict[str, list[str]], info: dict | None = None) -> PerImageScores:
    """All ranks' pieces, ordered by store index, metric-first and image-last."""
    gathered = all_ranks(parts.local())
    index = np.concatenate([g[0] for g in gathered])
    keys = list(dict.fromkeys(k for g in gathered for k in g[1]))
    order = np.argsort(index, kind="stable")
    if np.unique(index).size != index.size:
        raise RuntimeError("a test image was scored twice (overlapping test shards): per-image scores would "
                           "count it twice")
    arrays = {}
    for k in keys:
        a = np.concatenate([g[1][k] for g in gathered if k in g[1]])
        if a.shape[0] != index.size:
            raise RuntimeError(f"per-image scores {k!r} cover {a.shape[0]} of the {index.size} test images")
        a = np.moveaxis(a[order], 0, -1)                      # image last
        arrays[k] = np.moveaxis(a, -2, 0) if a.ndim > 2 else a  # metric first
    return PerImageScores(index[order], list(layers), [int(s) for s in steps], metrics, arrays, dict(info or {}))
