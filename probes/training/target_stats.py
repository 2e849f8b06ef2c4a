"""Target statistics of regression labels: the z-score the probes train on, from the train split only."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def target_stats(labels: np.ndarray, indices: Sequence[int], chunk: int = 16) -> dict[str, float]:
    """Mean and std of the raw labels over the train split (all pixels), saved with the probes."""
    s = s2 = n = 0.0
    for k in range(0, len(indices), chunk):
        x = np.asarray(labels[list(indices[k:k + chunk])], dtype=np.float64)
        s, s2, n = s + x.sum(), s2 + (x * x).sum(), n + x.size
    mean = s / max(n, 1)
    std = float(np.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0)))
    return {"mean": float(mean), "std": std if std > 0 else 1.0}
