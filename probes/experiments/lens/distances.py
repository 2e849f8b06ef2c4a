"""Distance measures between embeddings, by name, all delegated to ``scipy.spatial.distance``.

The lens compares how well each layer keeps semantics *under a given distance*, so distances are
chosen by name in configs and reports. The four studied by default are :data:`DEFAULT_DISTANCES`;
any other ``scipy.spatial.distance.cdist`` metric name works too (e.g. ``"correlation"``,
``"braycurtis"``, ``"minkowski"`` with ``p=3``). Common aliases (``manhattan``, ``l1``, ``l2``,
``linf``) map to scipy's names so reports can use the familiar words.

Note: cosine distance is undefined for an all-zero vector (scipy returns NaN).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import distance as _scipy

DEFAULT_DISTANCES: tuple[str, ...] = ("cosine", "euclidean", "cityblock", "chebyshev")

ALIASES: dict[str, str] = {
    "manhattan": "cityblock",
    "l1": "cityblock",
    "taxicab": "cityblock",
    "l2": "euclidean",
    "linf": "chebyshev",
    "maximum": "chebyshev",
}

# scipy has no public list of its metric names; fall back to the names of scipy 1.15 if the
# private one ever moves.
SCIPY_METRICS: tuple[str, ...] = tuple(getattr(_scipy, "_METRICS_NAMES", (
    "braycurtis", "canberra", "chebyshev", "cityblock", "correlation", "cosine", "dice",
    "euclidean", "hamming", "jaccard", "jensenshannon", "mahalanobis", "minkowski",
    "rogerstanimoto", "russellrao", "seuclidean", "sokalsneath", "sqeuclidean", "yule")))


def valid_names() -> list[str]:
    """Every accepted distance name (scipy's metrics and the aliases), sorted."""
    return sorted(set(SCIPY_METRICS) | set(ALIASES))


def resolve(name: str) -> str:
    """scipy's metric name for ``name``; an unknown name fails listing the valid ones, early,
    instead of deep inside a long feature-extraction run."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCIPY_METRICS:
        raise ValueError(f"unknown distance {name!r}; valid names: {', '.join(valid_names())}")
    return key


def cdist(a: Any, b: Any, name: str = "cosine", **kwargs: Any) -> np.ndarray:
    """``[len(a), len(b)]`` distances between the rows of ``a`` and ``b`` (float64).

    Extra keyword arguments go to scipy (e.g. ``p`` for ``minkowski``).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    return _scipy.cdist(a, b, metric=resolve(name), **kwargs)


def pairwise(x: Any, name: str = "cosine", **kwargs: Any) -> np.ndarray:
    """Square ``[N, N]`` distance matrix of the rows of ``x`` (via ``pdist``: half the work)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if len(x) < 2:
        return np.zeros((len(x), len(x)))
    return _scipy.squareform(_scipy.pdist(x, metric=resolve(name), **kwargs))
