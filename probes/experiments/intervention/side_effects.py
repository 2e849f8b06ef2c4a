"""What an edit changed besides what it asked for: pixels, colour, shape, activation statistics, probe loss.

Why: an edit that moves the object but repaints it (or the no-op that changes the picture) shows
that the edit pushed the activations somewhere, not that the model uses what the probe reads. Each
measure here is one side effect, reported for every run:

- **pixel MAE and PSNR** between two uint8 images (the no-op against the original): MAE in 0..255
  units averaged over pixels and channels; PSNR ``10 log10(255² / MSE)``, ``inf`` for identical images.
- **colour shift**, CIELAB ΔE through OpenCV (``cv2.cvtColor`` on float32 RGB in [0, 1], so L is in
  0..100 and a, b in about -128..127, D65, the sRGB curve). **CIE76** (the Euclidean Lab distance):
  the bar is a coarse "same colour" threshold (ΔE <= 10, where 2.3 is a just-noticeable difference),
  at which CIE76 and CIEDE2000 rank shifts alike; CIE76 needs nothing beyond OpenCV's conversion and
  its values are checked by hand in the tests. OpenCV linearises sRGB through an interpolated table:
  measured over a 52³ grid of RGB colours its Lab is within 0.50 ΔE of the exact CIE formulas (mean
  0.16), a fifth of a just-noticeable difference. Two forms: per pixel over a mask
  (:func:`mean_delta_e`: the object stayed put, e.g. the no-op) and between the object's mean Lab
  colours under its own mask in each image (:func:`object_colour_shift`: the object moved).
- **shape kept**: the classifier's answer before and after, compared per image (:func:`same_class`).
- **distribution shift** of activations: the Mahalanobis distance of tokens under a (step, layer)'s
  token mean and covariance from the store (:class:`TokenGaussian`), reported as the ratio of edited
  tokens' mean distance to unedited tokens' (1: the edit stays as typical as the model's own
  activations). The covariance is shrunk with the ``concept-erasure`` package's optimal linear
  shrinkage towards ``tr(S)/d · I`` (the estimator LEACE uses, so both see the same covariance),
  which keeps it invertible when channels outnumber what the tokens pin down; ``shrinkage=False``
  is the plain unbiased covariance (then at least ``channels + 1`` tokens are needed).
- **probe loss** before -> after an edit, per image (:func:`probe_losses`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from concept_erasure import optimal_linear_shrinkage

from probes.experiments.intervention.editor import EditRecord

PEAK = 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"compare two uint8 images of one shape, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    return a, b


def pixel_mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 0..255 units over every pixel and channel."""
    a, b = _pair(a, b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); ``inf`` for identical images."""
    a, b = _pair(a, b)
    mse = float(np.square(a.astype(np.float64) - b.astype(np.float64)).mean())
    return math.inf if mse == 0 else 10 * math.log10(PEAK ** 2 / mse)


def to_lab(image: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> CIELAB float32 (L 0..100) through OpenCV."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"to_lab needs an RGB uint8 image [H, W, 3], got {image.dtype}{image.shape}")
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def delta_e_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE76 ΔE per pixel ``[H, W]`` between two RGB uint8 images."""
    a, b = _pair(a, b)
    return np.linalg.norm(to_lab(a).astype(np.float64) - to_lab(b).astype(np.float64), axis=-1)


def _mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image's {shape[:2]}")
    return mask


def mean_delta_e(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean per-pixel CIE76 ΔE over ``mask`` (the object in place); NaN for an empty mask."""
    m = _mask(mask, np.shape(a))
    return float(delta_e_map(a, b)[m].mean()) if m.any() else math.nan


def object_colour_shift(a: np.ndarray, mask_a: np.ndarray, b: np.ndarray, mask_b: np.ndarray) -> float:
    """CIE76 ΔE between the object's mean Lab colour in ``a`` (under ``mask_a``) and in ``b`` (under
    ``mask_b``): the colour change of an object that may have moved. NaN when either mask is empty
    (the object vanished: no colour to compare)."""
    ma, mb = _mask(mask_a, np.shape(a)), _mask(mask_b, np.shape(b))
    if not ma.any() or not mb.any():
        return math.nan
    mean_a = to_lab(a)[ma].astype(np.float64).mean(0)
    mean_b = to_lab(b)[mb].astype(np.float64).mean(0)
    return float(np.linalg.norm(mean_a - mean_b))


def same_class(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per image, whether the classifier's answer is unchanged: ``[B]`` class indices, or ``[B, K]``
    multi-label answers (bool or 0/1: every label must agree)."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.ndim not in (1, 2):
        raise ValueError(f"give the classifier's answers as [B] or [B, K] arrays of one shape, "
                         f"got {before.shape} and {after.shape}")
    equal = before == after
    return equal if equal.ndim == 1 else equal.all(axis=1)


class TokenGaussian:
    """Token mean and (shrunk) covariance of one (step, layer), accumulated in float64, and the
    Mahalanobis distance under them (module docstring)."""

    def __init__(self, channels: int, shrinkage: bool = True) -> None:
        self.channels, self.shrinkage = channels, shrinkage
        self.n = 0
        self._sum = np.zeros(channels)
        self._outer = np.zeros((channels, channels))
        self._fitted: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, x: np.ndarray) -> TokenGaussian:
        x = np.asarray(x, np.float64).reshape(-1, self.channels)
        self.n += len(x)
        self._sum += x.sum(0)
        self._outer += x.T @ x
        self._fitted = None
        return self

    def covariance(self) -> np.ndarray:
        if self.n < 2 or (not self.shrinkage and self.n <= self.channels):
            raise ValueError(f"{self.n} tokens cannot estimate a {self.channels}-channel covariance"
                             f"{'' if self.shrinkage else ' without shrinkage (need channels + 1)'}; use more samples")
        mean = self._sum / self.n
        biased = self._outer / self.n - np.outer(mean, mean)
        biased = (biased + biased.T) / 2
        if self.shrinkage:
            return optimal_linear_shrinkage(torch.from_numpy(biased), self.n).numpy()
        return biased * self.n / (self.n - 1)

    def fitted(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean ``[d]``, precision ``[d, d]``), computed once per update."""
        if self._fitted is None:
            self._fitted = (self._sum / self.n if self.n else self._sum, np.linalg.inv(self.covariance()))
        return self._fitted

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of every token of ``x [..., d]`` (flattened to ``[N]``): ``sqrt(dᵀ P d)``
        with one matrix product for all tokens (scipy's ``cdist(..., "mahalanobis")`` loops over them;
        the tests check both agree)."""
        mean, precision = self.fitted()
        d = np.asarray(x, np.float64).reshape(-1, self.channels) - mean
        return np.sqrt(np.maximum(np.einsum("nd,nd->n", d @ precision, d), 0.0))

    def ratio(self, edited: np.ndarray, unedited: np.ndarray) -> float:
        """Mean distance of ``edited`` tokens over the mean distance of ``unedited`` ones."""
        return float(self.distances(edited).mean() / self.distances(unedited).mean())


def fit_token_gaussians(store: Any, keys: Iterable[tuple[int, str]], indices: Sequence[int], half: str = "cond",
                        shrinkage: bool = True) -> dict[tuple[int, str], TokenGaussian]:
    """One :class:`TokenGaussian` per (step, layer) from the store's samples ``indices`` (training
    samples: the distribution the edits are compared against)."""
    capture = store.manifest["capture"]
    slot = {int(s): k for k, s in enumerate(capture["steps"])}
    if half not in capture["halves"]:
        raise ValueError(f"the store at {store.root} holds halves {capture['halves']}, not {half!r}")
    h = list(capture["halves"]).index(half)
    out = {}
    for step, layer in sorted({(int(s), str(layer)) for s, layer in keys}):
        if step not in slot:
            raise ValueError(f"step {step} is not in the store at {store.root} (captured steps {capture['steps']})")
        if layer not in store.acts:
            raise KeyError(f"layer {layer!r} is not in the store at {store.root}; stored: {', '.join(store.layer_names)}")
        g = out[(step, layer)] = TokenGaussian(int(store.acts[layer].shape[-1]), shrinkage)
        for i in indices:
            g.update(store.activation(layer, int(i))[slot[step], h])
    return out


def shift_measure(gaussians: Mapping[tuple[int, str], TokenGaussian]
                  ) -> Callable[[tuple[int, str], torch.Tensor, torch.Tensor], list[float] | None]:
    """An editor's ``measure``: per image, the :meth:`TokenGaussian.ratio` of its edited tokens to the
    same tokens before the edit, under the edited (step, layer)'s Gaussian (None where none was fitted)."""
    def measure(key: tuple[int, str], before: torch.Tensor, after: torch.Tensor) -> list[float] | None:
        g = gaussians.get((int(key[0]), str(key[1])))
        if g is None:
            return None
        b = before.detach().float().cpu().numpy()
        a = after.detach().float().cpu().numpy()
        return [g.ratio(a[i], b[i]) for i in range(len(b))]
    return measure


def probe_losses(records: Sequence[EditRecord], image: int) -> tuple[float, float]:
    """Image ``image``'s probe loss before and after, averaged over the run's edits (NaN: no edit)."""
    if not records:
        return math.nan, math.nan
    return (float(np.mean([r.loss_before[image] for r in records])),
            float(np.mean([r.loss_after[image] for r in records])))
