"""The lens experiments as functions of cached object embeddings: each returns long-form rows.

Every experiment is computed from :class:`~probes.experiments.lens.embeddings.ObjectEmbeddings`, so scoring
is separate from (and much cheaper than) feature extraction, and testable without a U-Net:

- :func:`semantic_rows`: class scores of each layer and layer combination under each distance
  (k-NN accuracy, retrieval mAP, intra/inter-class distance ratio, with chance levels), via
  :func:`probes.experiments.lens.scores.layer_ablation`;
- :func:`paired_rows`: an embedding *variant* (a transformed image, another timestep, more
  denoising steps) against the *reference* embeddings of the same objects: per-object distance
  (raw, and relative to the reference's mean distance between different objects, so layers and
  distances of different scale compare), instance matching (is a variant object's nearest
  reference object itself?), class retrieval (is its nearest *other* reference object of its
  class?), the fraction of objects still visible, and the variant's own k-NN accuracy;
- :func:`video_rows`: the same objects across video frames, per frame gap: distance and
  instance matching within the sequence and against every sequence's objects of that frame.

A row is ``{model, experiment, layers, distance, factor, level, metric, value, n}``;
``metrics.csv`` holds them all (:data:`COLUMNS`).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from probes.experiments.lens.distances import DEFAULT_DISTANCES, cdist, pairwise
from probes.experiments.lens.embeddings import ObjectEmbeddings
from probes.experiments.lens.pooling import concat_layers
from probes.experiments.lens.scores import knn_accuracy, knn_chance, layer_ablation

COLUMNS = ["model", "experiment", "layers", "distance", "factor", "level", "metric", "value", "n"]
SEMANTIC_METRICS = ("knn_accuracy", "knn_chance", "map", "map_chance", "ratio", "intra", "inter")
COMBO_SEP = "+"


def _row(model: str, experiment: str, layers: str, distance: str, factor: str, level: float,
         metric: str, value: float, n: int) -> dict[str, Any]:
    return {"model": model, "experiment": experiment, "layers": layers, "distance": distance, "factor": factor,
            "level": float(level), "metric": metric, "value": float(value), "n": int(n)}


def combination(objects: ObjectEmbeddings, name: str) -> np.ndarray:
    """Vectors of a layer (``down0.res0``) or a combination (``down0.res0+down0.attn0``): each
    layer L2-normalised, then concatenated (:func:`probes.experiments.lens.pooling.concat_layers`)."""
    parts = name.split(COMBO_SEP)
    if len(parts) == 1:
        return objects.layer(name)
    return concat_layers([objects.layer(p) for p in parts], normalize=True)


def labelled(objects: ObjectEmbeddings) -> ObjectEmbeddings:
    """Only the objects with a class (DAVIS objects have none unless a mapping is given)."""
    return objects.select(objects.label >= 0)


def semantic_rows(objects: ObjectEmbeddings, names: Iterable[str], distances: Sequence[str] = DEFAULT_DISTANCES,
                  k: int = 1, model: str = "model", experiment: str = "semantic", factor: str = "",
                  level: float = 0.0) -> list[dict[str, Any]]:
    """Class scores of every layer / combination in ``names`` under every distance."""
    objs = labelled(objects)
    if len(objs) < 2 or len(np.unique(objs.label)) < 2:
        raise ValueError(f"class scores need >= 2 labelled objects of >= 2 classes; got {len(objs)} objects of "
                         f"classes {sorted(set(objs.label.tolist()))}: use more images or a dataset with classes")
    embeddings = {name: combination(objs, name) for name in names}
    rows = []
    for r in layer_ablation(embeddings, objs.label, distances, k, sort_by="knn_accuracy"):
        for metric in SEMANTIC_METRICS:
            rows.append(_row(model, experiment, r["layers"], r["distance"], factor, level, metric, r[metric], r["n"]))
    return rows


def ranking(rows: Sequence[dict[str, Any]], distance: str, metric: str = "knn_accuracy", model: str = "model",
            experiment: str = "semantic", singles_only: bool = False) -> list[tuple[str, float]]:
    """``(layers, value)`` best first for one distance; ties broken by mAP, then forward order."""
    sel = [r for r in rows if r["model"] == model and r["experiment"] == experiment and r["distance"] == distance]
    value = {r["layers"]: r["value"] for r in sel if r["metric"] == metric}
    tie = {r["layers"]: r["value"] for r in sel if r["metric"] == "map"}
    order = list(dict.fromkeys(r["layers"] for r in sel))
    names = [n for n in order if not (singles_only and COMBO_SEP in n) and value.get(n) == value.get(n)]
    return sorted(((n, value[n]) for n in names), key=lambda p: (-p[1], -tie.get(p[0], 0.0), order.index(p[0])))


def auto_combinations(ranked_singles: Sequence[str], top: int) -> list[str]:
    """Every pair of the ``top`` best single layers, and all ``top`` together (when > 2)."""
    best = list(ranked_singles[:top])
    combos = [COMBO_SEP.join(p) for p in itertools.combinations(best, 2)]
    if len(best) > 2:
        combos.append(COMBO_SEP.join(best))
    return combos


def distinct_layers(objects: ObjectEmbeddings, names: Sequence[str]) -> list[str]:
    """``names`` without layers whose vectors equal an earlier one's (``down0.out`` is
    ``down0.downsample``'s output), so combinations and sweeps do not spend work on a duplicate."""
    kept: list[str] = []
    for name in names:
        if not any(np.array_equal(objects.layer(name), objects.layer(k)) for k in kept):
            kept.append(name)
    return kept


def _mean_offdiag(d: np.ndarray) -> float:
    n = len(d)
    return float(d[~np.eye(n, dtype=bool)].mean()) if n > 1 else float("nan")


def _nearest_other_same_class(d: np.ndarray, self_index: np.ndarray, q_labels: np.ndarray,
                              g_labels: np.ndarray) -> tuple[float, float]:
    """Class retrieval of queries against a gallery that contains each query's own original
    (``self_index``), which is excluded: accuracy, and the chance of a random other item."""
    d = d.copy()
    d[np.arange(len(d)), self_index] = np.inf
    nearest = np.argmin(d, axis=1)
    acc = float(np.mean(g_labels[nearest] == q_labels))
    same = (g_labels[None, :] == q_labels[:, None]).sum(axis=1) - 1      # other members of its class
    chance = float(np.mean(same / max(len(g_labels) - 1, 1)))
    return acc, chance


def paired_rows(reference: ObjectEmbeddings, variant: ObjectEmbeddings, layers: Iterable[str],
                distances: Sequence[str], model: str, experiment: str, factor: str, level: float,
                k: int = 1) -> list[dict[str, Any]]:
    """Variant vs reference embeddings of the same objects (see the module docstring)."""
    ref_key, var_key = reference.key, variant.key
    common = np.isin(var_key, ref_key)
    var = variant.select(common)
    pos = {key: i for i, key in enumerate(ref_key)}
    self_index = np.array([pos[key] for key in var.key], dtype=np.int64)
    rows = []
    n_ref, n = len(reference), len(var)
    for layer in layers:
        g, q = combination(reference, layer), combination(var, layer)
        for distance in distances:
            common_row = dict(model=model, experiment=experiment, layers=layer, distance=distance, factor=factor,
                              level=level)
            rows.append(_row(**common_row, metric="kept_fraction", value=n / max(n_ref, 1), n=n_ref))
            if n == 0:
                continue
            d = cdist(q, g, distance)                                   # [n, n_ref]
            own = d[np.arange(n), self_index]
            scale = _mean_offdiag(pairwise(g, distance))
            match = float(np.mean(np.argmin(d, axis=1) == self_index))
            rows += [_row(**common_row, metric="distance", value=float(np.mean(own)), n=n),
                     _row(**common_row, metric="relative_distance", value=float(np.mean(own)) / scale, n=n),
                     _row(**common_row, metric="instance_matching", value=match, n=n),
                     _row(**common_row, metric="instance_matching_chance", value=1.0 / n_ref, n=n)]
            has = var.label >= 0
            if has.sum() >= 2 and n_ref >= 2:
                acc, chance = _nearest_other_same_class(d[has], self_index[has], var.label[has], reference.label)
                rows += [_row(**common_row, metric="class_retrieval", value=acc, n=int(has.sum())),
                         _row(**common_row, metric="class_retrieval_chance", value=chance, n=int(has.sum()))]
                if len(np.unique(var.label[has])) >= 2:
                    dv = pairwise(q[has], distance)
                    rows += [_row(**common_row, metric="knn_accuracy", value=knn_accuracy(dv, var.label[has], k),
                                  n=int(has.sum())),
                             _row(**common_row, metric="knn_chance", value=knn_chance(var.label[has]),
                                  n=int(has.sum()))]
    return rows


def video_rows(objects: ObjectEmbeddings, layers: Iterable[str], distances: Sequence[str], model: str,
               max_gap: int | None = None) -> list[dict[str, Any]]:
    """Per frame gap g: objects of frame f + g against those of frame f (see the module docstring).

    Frames are compared by their position in the sequence (``frame``), so gaps are real frame
    gaps even where unannotated frames were skipped.
    """
    seqs = sorted(set(objects.sequence.tolist()) - {""})
    if not seqs:
        raise ValueError("video_rows needs objects with a sequence and a frame (a video dataset)")
    frames_of = {s: sorted(set(objects.frame[objects.sequence == s].tolist())) for s in seqs}
    span = max(max(f) - min(f) for f in frames_of.values())
    gaps = range(1, (span if max_gap is None else min(span, max_gap)) + 1)
    rows = []
    for layer in layers:
        x = combination(objects, layer)
        for distance in distances:
            scale = _mean_offdiag(pairwise(x, distance))
            for gap in gaps:
                own, hit_seq, chance_seq, hit_all, chance_all = [], [], [], [], []
                for s in seqs:
                    for f in frames_of[s]:
                        if f + gap not in frames_of[s]:
                            continue
                        q = np.flatnonzero((objects.sequence == s) & (objects.frame == f + gap))
                        g = np.flatnonzero((objects.sequence == s) & (objects.frame == f))
                        g_all = np.flatnonzero(objects.frame == f)
                        ids_q, ids_g = objects.instance[q], objects.instance[g]
                        valid = np.isin(ids_q, ids_g)
                        if not valid.any():
                            continue
                        q = q[valid]
                        d = cdist(x[q], x[g], distance)
                        same = objects.instance[q][:, None] == ids_g[None, :]
                        own += d[same].tolist()
                        hit_seq += (ids_g[np.argmin(d, axis=1)] == objects.instance[q]).tolist()
                        chance_seq += [1.0 / len(g)] * len(q)
                        d_all = cdist(x[q], x[g_all], distance)
                        nearest = g_all[np.argmin(d_all, axis=1)]
                        hit_all += ((objects.sequence[nearest] == s)
                                    & (objects.instance[nearest] == objects.instance[q])).tolist()
                        chance_all += [1.0 / len(g_all)] * len(q)
                if not own:
                    continue
                base = dict(model=model, experiment="video", layers=layer, distance=distance, factor="frame_gap",
                            level=gap, n=len(own))
                rows += [_row(**base, metric="distance", value=float(np.mean(own))),
                         _row(**base, metric="relative_distance", value=float(np.mean(own)) / scale),
                         _row(**base, metric="instance_matching", value=float(np.mean(hit_seq))),
                         _row(**base, metric="instance_matching_chance", value=float(np.mean(chance_seq))),
                         _row(**base, metric="instance_matching_all", value=float(np.mean(hit_all))),
                         _row(**base, metric="instance_matching_all_chance", value=float(np.mean(chance_all)))]
    return rows


def best_layer(rows: Sequence[dict[str, Any]], distance: str, model: str = "model",
               metric: str = "knn_accuracy") -> str:
    """The best single layer of the semantic experiment (``metric`` under ``distance``)."""
    ranked = ranking(rows, distance, metric, model, singles_only=True)
    if not ranked:
        raise ValueError(f"no semantic rows for model {model!r} and distance {distance!r}")
    return ranked[0][0]


def value_of(rows: Sequence[dict[str, Any]], **match: Any) -> float:
    """The value of the one row matching every given column (NaN if none)."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return float(hits[0]["value"]) if hits else float("nan")


def control_gap(rows: Sequence[dict[str, Any]], distance: str, control: str = "control",
                model: str = "model") -> dict[str, Any]:
    """The bar of issue 13: the model's best layer's k-NN accuracy, the control's on that same
    layer and distance, their difference, and chance."""
    layer = best_layer(rows, distance, model)
    get = lambda m, metric: value_of(rows, model=m, experiment="semantic", layers=layer,  # noqa: E731
                                     distance=distance, metric=metric)
    out = {"layer": layer, "distance": distance, "model_knn": get(model, "knn_accuracy"),
           "control_knn": get(control, "knn_accuracy"), "chance": get(model, "knn_chance")}
    out["gap"] = out["model_knn"] - out["control_knn"]
    return out


def csv_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with exactly :data:`COLUMNS`, in that order (for ``metrics.csv``)."""
    return [{c: r.get(c, "") for c in COLUMNS} for r in rows]
