"""How well embeddings keep object semantics, under one distance: class separation, leave-one-out
k-NN accuracy, retrieval mAP (with their chance levels), and instance matching across
transformations or video frames.

All class scores take a square distance matrix ``D`` (from :func:`.distances.pairwise`) so one
matrix serves every score; :func:`class_scores` and :func:`layer_ablation` wrap that for
embeddings. Memory and time are O(N^2) in the number of objects: subsample large datasets.

Conventions, chosen so that results do not depend on accidents of order:

- **Ties in distance** are broken by item order (stable sort), for k-NN neighbours, retrieval
  ranks and nearest gallery items alike; with real-valued features exact ties are rare.
- **k-NN vote ties** (two classes with the same number of votes among the k neighbours) go to the
  tied class whose member is nearest to the query, i.e. k is effectively reduced until the tie
  breaks; with k = 1 there is no vote.
- **Queries without a relevant item** (a class with a single member) are left out of mAP, since
  their average precision is undefined; their chance level is left out likewise.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from probes.experiments.lens.distances import DEFAULT_DISTANCES, cdist, pairwise


def _labels(y: Any) -> np.ndarray:
    """Class labels as dense ints 0..K-1 (labels may be ints or strings)."""
    return np.unique(np.asarray(y), return_inverse=True)[1].reshape(-1)


def _check_square(d: np.ndarray, n: int) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.shape != (n, n):
        raise ValueError(f"distance matrix must be [{n}, {n}] for {n} labels, got {d.shape}")
    return d


def _neighbour_order(d: np.ndarray) -> np.ndarray:
    """``[N, N-1]``: for each item, the other items from nearest to farthest (stable)."""
    n = len(d)
    order = np.argsort(d, axis=1, kind="stable")
    return order[order != np.arange(n)[:, None]].reshape(n, n - 1)


def class_separation(d: np.ndarray, y: Any) -> dict[str, float]:
    """Mean intra-class and inter-class distance over item pairs, and ``ratio = intra / inter``.

    A ratio below 1 means objects of a class sit closer together than objects of different classes;
    lower is better, and it is scale-free, so layers of different magnitude compare fairly. Means
    are over pairs (large classes weigh more). NaN where a kind of pair does not exist.
    """
    labels = _labels(y)
    d = _check_square(d, len(labels))
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    intra_pairs, inter_pairs = d[same & off_diag], d[~same]
    intra = float(intra_pairs.mean()) if intra_pairs.size else float("nan")
    inter = float(inter_pairs.mean()) if inter_pairs.size else float("nan")
    ratio = intra / inter if inter_pairs.size and intra_pairs.size and inter > 0 else float("nan")
    return {"intra": intra, "inter": inter, "ratio": ratio}


def knn_predict(d: np.ndarray, y: Any, k: int = 1) -> np.ndarray:
    """Leave-one-out k-NN class of every item (majority vote; tie rule in the module docstring)."""
    y = np.asarray(y)
    classes, labels = np.unique(y, return_inverse=True)
    labels = labels.reshape(-1)
    d = _check_square(d, len(labels))
    if len(labels) < 2:
        raise ValueError("leave-one-out k-NN needs at least 2 items")
    k = max(1, min(k, len(labels) - 1))
    neighbours = labels[_neighbour_order(d)[:, :k]]                       # [N, k] class indices
    votes = np.zeros((len(labels), len(classes)), dtype=np.int64)
    np.add.at(votes, (np.arange(len(labels))[:, None], neighbours), 1)
    tied = votes == votes.max(axis=1, keepdims=True)                      # [N, K]
    first_tied = np.take_along_axis(tied, neighbours, axis=1).argmax(axis=1)
    return classes[neighbours[np.arange(len(labels)), first_tied]]


def knn_accuracy(d: np.ndarray, y: Any, k: int = 1) -> float:
    """Fraction of items whose leave-one-out k-NN class is their own class."""
    return float(np.mean(knn_predict(d, y, k) == np.asarray(y)))


def knn_chance(y: Any) -> float:
    """Majority-class rate: the accuracy of always answering the most frequent class."""
    counts = np.bincount(_labels(y))
    return float(counts.max() / counts.sum())


def average_precisions(d: np.ndarray, y: Any) -> np.ndarray:
    """Average precision of every item used as a query against all the others (relevant = same
    class): the mean, over the relevant items, of the precision at each one's rank. NaN for an
    item whose class has no other member."""
    labels = _labels(y)
    d = _check_square(d, len(labels))
    if len(labels) < 2:
        return np.full(len(labels), np.nan)
    relevant = labels[_neighbour_order(d)] == labels[:, None]            # [N, N-1]
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    n_relevant = relevant.sum(axis=1)
    ap = np.full(len(labels), np.nan)
    has = n_relevant > 0
    ap[has] = (precision * relevant).sum(axis=1)[has] / n_relevant[has]
    return ap


def retrieval_map(d: np.ndarray, y: Any) -> float:
    """Mean average precision over queries that have at least one relevant item."""
    ap = average_precisions(d, y)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def expected_random_ap(n_relevant: int, n_items: int) -> float:
    """Exact expected average precision of a uniformly random ranking of ``n_items`` items of which
    ``n_relevant`` are relevant: ``H_M / M + (R - 1)(M - H_M) / (M (M - 1))`` with ``H_M`` the
    M-th harmonic number. It is close to the relevant fraction ``R / M`` for large ``M`` but higher
    for small sets, where using the fraction would flatter every model."""
    r, m = n_relevant, n_items
    if not 1 <= r <= m:
        raise ValueError(f"need 1 <= relevant <= items, got {r} of {m}")
    if m == 1:
        return 1.0
    h = float(np.sum(1.0 / np.arange(1, m + 1)))
    return h / m + (r - 1) * (m - h) / (m * (m - 1))


def map_chance(y: Any) -> float:
    """mAP of random rankings for these labels (queries as in :func:`retrieval_map`)."""
    counts = np.bincount(_labels(y))
    n = int(counts.sum())
    values = [expected_random_ap(c - 1, n - 1) for c in counts if c >= 2]
    weights = [c for c in counts if c >= 2]    # each of the c members of a class is a query
    return float(np.average(values, weights=weights)) if values else float("nan")


def instance_matching_accuracy(
    query: Any,
    query_ids: Any,
    gallery: Any,
    gallery_ids: Any,
    distance: str = "cosine",
) -> float:
    """Fraction of query objects whose nearest gallery object is the same instance.

    Used with queries from a transformed image (or a later video frame) and the gallery from the
    original (or the first frame). Queries whose id is not in the gallery (an object that appears
    only later) are left out: nothing could match them. NaN when no query is left.
    """
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    valid = np.isin(query_ids, gallery_ids)
    if not valid.any():
        return float("nan")
    d = cdist(np.asarray(query)[valid], gallery, distance)
    nearest = gallery_ids[np.argmin(d, axis=1)]
    return float(np.mean(nearest == query_ids[valid]))


def matching_chance(query_ids: Any, gallery_ids: Any) -> float:
    """Instance matching accuracy of a random nearest gallery item (same query filter)."""
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    valid = query_ids[np.isin(query_ids, gallery_ids)]
    if not len(valid):
        return float("nan")
    return float(np.mean([np.mean(gallery_ids == q) for q in valid]))


def class_scores(x: Any, y: Any, distance: str = "cosine", k: int = 1) -> dict[str, float]:
    """Every class score of embeddings ``x`` ``[N, D]`` under one distance, with chance levels."""
    x = np.asarray(x, dtype=np.float64)
    d = pairwise(x, distance)
    return {
        "knn_accuracy": knn_accuracy(d, y, k),
        "knn_chance": knn_chance(y),
        "map": retrieval_map(d, y),
        "map_chance": map_chance(y),
        **class_separation(d, y),
    }


HIGHER_IS_BETTER = {"knn_accuracy": True, "map": True, "inter": True, "ratio": False,
                    "intra": False}


def layer_ablation(
    embeddings: Mapping[str, Any],
    y: Any,
    distances: Iterable[str] = DEFAULT_DISTANCES,
    k: int = 1,
    sort_by: str = "map",
) -> list[dict[str, Any]]:
    """One row per (layer or layer combination, distance), best first by ``sort_by``.

    ``embeddings`` maps a name (a layer, or a combination built with
    :func:`.pooling.concat_layers`) to its ``[N, D]`` embeddings of the same N objects as ``y``.
    Rows carry ``layers``, ``distance``, ``n``, ``dim`` and the keys of :func:`class_scores`; rows
    whose ``sort_by`` score is NaN come last.
    """
    if sort_by not in HIGHER_IS_BETTER:
        raise ValueError(f"sort_by must be one of {sorted(HIGHER_IS_BETTER)}, got {sort_by!r}")
    distances: Sequence[str] = list(distances)
    n = len(np.asarray(y))
    rows = []
    for name, x in embeddings.items():
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) != n:
            raise ValueError(f"{name}: embeddings must be [{n}, D], got {x.shape}")
        if np.isnan(x).any():
            raise ValueError(f"{name}: embeddings contain NaN rows (drop vanished instances)")
        for distance in distances:
            rows.append({"layers": name, "distance": distance, "n": n, "dim": x.shape[1],
                         **class_scores(x, y, distance, k)})
    sign = 1.0 if HIGHER_IS_BETTER[sort_by] else -1.0
    return sorted(rows, key=lambda r: (np.isnan(r[sort_by]),
                                       -sign * np.nan_to_num(r[sort_by])))
