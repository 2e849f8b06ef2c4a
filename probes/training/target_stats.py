"""Label checks and target statistics: the z-score the probes train on, from the train split only.

A label cache is read once per run, sample by sample: each sample's minimum, maximum, sum and sum
of squares give the target statistics, tell a binary task whose labels are all empty apart from a
usable one, and a single non-finite pixel stops the run with the file and the sample named. One
NaN pixel would otherwise make every Spearman of its task look excellent (NaN ranks last).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class NonFiniteLabels(ValueError):
    """A label array holds NaN or infinite values."""


@dataclass(frozen=True)
class LabelScan:
    """Per-sample summaries of a label array ``[N, H, W]`` (rows not scanned are NaN / 0)."""

    min: np.ndarray       # [N] float64
    max: np.ndarray       # [N] float64
    sum: np.ndarray       # [N] float64
    sumsq: np.ndarray     # [N] float64
    pixels: int           # per sample

    def stats(self, indices: Sequence[int]) -> dict[str, float]:
        """Mean and std over all pixels of ``indices`` (the train split)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        n = self.pixels * len(idx)
        mean = float(self.sum[idx].sum() / max(n, 1))
        std = float(np.sqrt(max(self.sumsq[idx].sum() / max(n, 1) - mean * mean, 0.0)))
        return {"mean": mean, "std": std if std > 0 else 1.0}


def _describe(index: int) -> str:
    return f"sample {index}"


def scan_labels(labels: np.ndarray, indices: Sequence[int], path: str | Path | None = None,
                describe: Callable[[int], str] = _describe, what: str = "labels", fix: str = "",
                chunk: int = 16) -> LabelScan:
    """Summarise ``labels[indices]`` per sample; raise :class:`NonFiniteLabels` naming the bad samples.

    :param path: the file the labels come from, named in the error.
    :param describe: ``index -> "sample 17 (train, seed 3: 'a prompt')"`` for the error.
    :param what: what the array is, e.g. ``"labels of task 'depth' (labeler midas)"``.
    :param fix: what to do about a bad sample, appended to the error.
    """
    n = labels.shape[0]
    lo, hi = np.full(n, np.nan), np.full(n, np.nan)
    s, s2 = np.zeros(n), np.zeros(n)
    idx = sorted(int(i) for i in indices)
    bad: list[tuple[int, int]] = []
    for k in range(0, len(idx), chunk):
        rows = idx[k:k + chunk]
        x = np.asarray(labels[rows], dtype=np.float64).reshape(len(rows), -1)
        finite = np.isfinite(x)
        ok = finite.all(axis=1)
        for r, good, f in zip(rows, ok, finite):
            if not good:
                bad.append((r, int((~f).sum())))
        lo[rows], hi[rows] = x.min(axis=1), x.max(axis=1)
        s[rows], s2[rows] = x.sum(axis=1), (x * x).sum(axis=1)
    if bad:
        shown = "; ".join(f"{describe(i)}: {c} pixel(s)" for i, c in bad[:5])
        more = f" and {len(bad) - 5} more sample(s)" if len(bad) > 5 else ""
        where = f" in {path}" if path else ""
        raise NonFiniteLabels(f"non-finite (NaN or inf) {what}{where}: {shown}{more}. {fix}".rstrip())
    pixels = int(np.prod(labels.shape[1:], dtype=np.int64))
    return LabelScan(min=lo, max=hi, sum=s, sumsq=s2, pixels=pixels)


def target_stats(labels: np.ndarray, indices: Sequence[int], chunk: int = 16) -> dict[str, float]:
    """Mean and std of the raw labels over the train split (all pixels), saved with the probes.

    Refuses non-finite labels: a NaN mean would make every target NaN.
    """
    return scan_labels(labels, indices, chunk=chunk).stats(indices)


def scan_caches(caches: Mapping[str, Any], num_samples: int, train: Sequence[int],
                describe: Callable[[int], str] = _describe) -> tuple[dict[str, dict[str, float]], dict[str, tuple]]:
    """The target-statistics stage: one read of each task's label cache (``LabelCache``).

    :return: ``(stats, ranges)``: per task the train split's mean and std, and each sample's
        smallest and largest label value (binary tasks whose train labels are all empty or all
        full are refused by the probe module).
    """
    stats, ranges = {}, {}
    for t, c in caches.items():
        scan = scan_labels(c.array(), range(num_samples), c.path, describe,
                           f"labels of task {t!r} (labeler {c.labeler.name!r})",
                           f"The label cache is corrupt: delete {c.root} to recompute it"
                           + (" (the 'files' labeler re-reads its files: check them)" if c.labeler.name == "files"
                              else "") + ".")
        stats[t] = scan.stats(train)
        ranges[t] = (scan.min, scan.max)
    return stats, ranges
