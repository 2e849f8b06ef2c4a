"""One embedding per object: pool a U-Net feature map ``[C, h, w]`` over each instance mask ``[H, W]``.

Mask convention (shared by the datasets and the transforms): an ``int`` map with 0 = background,
:data:`IGNORE_ID` = void / unknown (VOC boundaries, COCO crowd regions, pixels a transform brought
in from outside the image) and every other value an instance id. Neither 0 nor ``IGNORE_ID`` is
ever pooled.

Both pooling rules reduce to a *weight map at feature resolution* per instance, followed by a
weighted mean of the feature vectors, so they share one code path:

- ``"area"``: the mask is down-sampled by exact area fractions - the weight of a feature cell is
  the fraction of that cell's area covered by the instance (``cv2.resize`` with ``INTER_AREA``
  computes exactly this, also for non-integer ratios). Feature cells on an object's border count
  in proportion to how much of the object they see, instead of all-or-nothing as with a nearest
  down-sampling, so small objects are not lost or misplaced.
- ``"upsample"``: the features are bilinearly up-sampled to the mask resolution (``torch``'s
  ``interpolate``, ``align_corners=False``) and averaged over the instance's pixels. Up-sampling
  is linear, so this equals a weighted mean at feature resolution with weights ``A_h^T m A_w``
  (``A`` the 1-D interpolation matrices): identical numbers without materialising a
  ``C x H x W`` tensor (1.3 GB for 1280 channels at 512x512).

Weights are expressed in feature cells, so an instance's total weight is its area measured in
cells (the same under both rules). **Vanishing rule:** an instance is kept when its area exceeds
``min_cells`` cells (default 0: kept whenever it has a pixel; neither rule can lose such an
instance, unlike a nearest down-sampling). Instances below the threshold, and requested ids that
are absent from the mask, are dropped (``missing="drop"``) or returned as NaN rows
(``missing="nan"``, for keeping rows aligned across layers or transformations).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

IGNORE_ID = -1
"""Mask value for void / unknown pixels; never pooled, never counted as background."""

DEFAULT_IGNORED = (0, IGNORE_ID)

Method = Literal["area", "upsample"]
Missing = Literal["drop", "nan"]


@dataclass(frozen=True)
class PooledInstances:
    """Embeddings with the instance id of each row, because rows can be dropped (vanishing rule)."""

    ids: np.ndarray         # [N] int64
    embeddings: np.ndarray  # [N, D] float64


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch for numpy callers
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    return np.asarray(x, dtype=dtype)


def instance_ids(instances: Any, ignore_ids: Iterable[int] = DEFAULT_IGNORED) -> np.ndarray:
    """Sorted instance ids present in a mask, without background and ignored values."""
    values = np.unique(_as_numpy(instances, np.int64))
    return values[~np.isin(values, list(ignore_ids))]


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` matrix of torch's 1-D linear up-sampling, read off by interpolating the
    identity, so the "upsample" rule matches ``F.interpolate(mode="bilinear")`` by construction."""
    import torch
    import torch.nn.functional as F

    eye = torch.eye(n_in, dtype=torch.float64)[None]                    # [1, n_in, n_in]
    up = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)  # [1, n_in, n_out]
    return up[0].T.numpy()


def instance_weights(
    instances: Any,
    feature_hw: tuple[int, int],
    method: Method = "area",
    ids: Sequence[int] | None = None,
    ignore_ids: Iterable[int] = DEFAULT_IGNORED,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance weight maps ``[N, h, w]`` at feature resolution, in units of feature cells.

    ``ids`` defaults to every instance in the mask; an absent id gets an all-zero map.
    """
    mask = _as_numpy(instances, np.int64)
    if mask.ndim != 2:
        raise ValueError(f"instance mask must be [H, W], got shape {mask.shape}")
    H, W = mask.shape
    h, w = feature_hw
    wanted = instance_ids(mask, ignore_ids) if ids is None else np.asarray(ids, dtype=np.int64)
    weights = np.zeros((len(wanted), h, w), dtype=np.float64)
    if method == "area":
        if H < h or W < w:
            raise ValueError(f"'area' pooling needs a mask at least as large as the features: "
                             f"mask {H}x{W}, features {h}x{w}; use method='upsample'")
        for n, k in enumerate(wanted):
            binary = (mask == k).astype(np.float32)
            weights[n] = cv2.resize(binary, (w, h), interpolation=cv2.INTER_AREA)
    elif method == "upsample":
        a_h, a_w = _interpolation_matrix(h, H), _interpolation_matrix(w, W)  # [H, h], [W, w]
        cells_per_pixel = (h * w) / (H * W)
        for n, k in enumerate(wanted):
            weights[n] = a_h.T @ (mask == k).astype(np.float64) @ a_w * cells_per_pixel
    else:
        raise ValueError(f"unknown pooling method {method!r}; choose 'area' or 'upsample'")
    return wanted, weights


def pool_instances(
    features: Any,
    instances: Any,
    method: Method = "area",
    ids: Sequence[int] | None = None,
    min_cells: float = 0.0,
    missing: Missing = "drop",
    ignore_ids: Iterable[int] = DEFAULT_IGNORED,
) -> PooledInstances:
    """Weighted-mean embedding of each instance (see the module docstring for the rules).

    ``features`` is ``[C, h, w]`` (torch or numpy), ``instances`` is ``[H, W]`` int.
    """
    feats = _as_numpy(features, np.float64)
    if feats.ndim != 3:
        raise ValueError(f"features must be [C, h, w], got shape {feats.shape}")
    if missing not in ("drop", "nan"):
        raise ValueError(f"missing must be 'drop' or 'nan', got {missing!r}")
    c, h, w = feats.shape
    wanted, weights = instance_weights(instances, (h, w), method, ids, ignore_ids)
    flat = weights.reshape(len(wanted), h * w)
    area = flat.sum(axis=1)
    kept = area > min_cells
    sums = flat @ feats.reshape(c, h * w).T
    embeddings = np.full((len(wanted), c), np.nan)
    embeddings[kept] = sums[kept] / area[kept, None]
    if missing == "drop":
        return PooledInstances(wanted[kept], embeddings[kept])
    return PooledInstances(wanted, embeddings)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero rather than becoming NaN."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def concat_layers(embeddings: Sequence[np.ndarray], normalize: bool = True) -> np.ndarray:
    """Embeddings of a layer combination: the layers' ``[N, D_l]`` rows side by side.

    With ``normalize`` (default) each layer's rows are L2-normalised first, because layers differ
    in width (320..1280 channels) and activation scale: without it the widest / loudest layer
    dominates every distance and the combination measures that layer alone. After normalisation
    each layer contributes equally to squared Euclidean distance and to the cosine.
    """
    if not embeddings:
        raise ValueError("no layers to concatenate")
    rows = {np.shape(e)[0] for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"layers disagree on the number of instances: {sorted(rows)}")
    parts = [l2_normalize(e) if normalize else np.asarray(e, dtype=np.float64) for e in embeddings]
    return np.concatenate(parts, axis=1)


def pool_layers(
    features: Mapping[str, Any],
    instances: Any,
    method: Method = "area",
    ids: Sequence[int] | None = None,
    min_cells: float = 0.0,
    normalize: bool = True,
    ignore_ids: Iterable[int] = DEFAULT_IGNORED,
) -> PooledInstances:
    """Embeddings of a layer combination for one image: pool each layer (own resolution), then
    :func:`concat_layers`. An instance is kept only if it survives the vanishing rule in every
    layer, so the rows of all layers describe the same objects."""
    if not features:
        raise ValueError("no layers given")
    wanted = instance_ids(instances, ignore_ids) if ids is None else np.asarray(ids, np.int64)
    pooled = [pool_instances(f, instances, method, wanted, min_cells, "nan", ignore_ids)
              for f in features.values()]
    kept = np.all([~np.isnan(p.embeddings).any(axis=1) for p in pooled], axis=0)
    combined = concat_layers([p.embeddings[kept] for p in pooled], normalize)
    return PooledInstances(wanted[kept], combined)
