"""Image transformations applied to an image and its instance mask together.

The lens asks how robust each layer's object embeddings are to rotation, flips, scale, padding,
crop and shift. Every transform here has the signature ``(image, mask, strength, **options) ->
(image, mask)`` with ``image`` ``HxWx3 uint8`` and ``mask`` ``HxW`` int, and moves both with the
same geometry so the transformed mask still says where each object is:

- masks are always resampled with nearest-neighbour interpolation, so ids are never blended
  (and with ``interpolation=cv2.INTER_NEAREST`` the image samples exactly the same pixels);
- pixels that come from outside the image get ``fill`` in the image (default black) and
  ``mask_fill`` in the mask (default :data:`~probes.experiments.lens.pooling.IGNORE_ID`: unknown, neither
  background nor an object);
- the image uses ``interpolation`` (default bilinear, the natural choice for photographs).

Strength, per transform (the identity strength in brackets): rotation in degrees,
counter-clockwise about the centre, canvas kept [0]; flips on/off, any non-zero strength flips
[0]; scale a zoom factor about the centre, canvas kept, < 1 shrinks and pads, > 1 enlarges and
crops [1]; padding a border of ``strength x side`` on every side, so the image grows [0]; crop the
centred window of ``strength x side`` that is kept [1]; shift a translation by ``strength x side``
(a float moves along both axes, ``(fx, fy)`` separately), rounded to whole pixels, canvas kept [0].
:data:`TRANSFORMS` lists them with a default strength sweep each.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from probes.experiments.lens.pooling import IGNORE_ID

Fill = int | tuple[int, int, int]
Pair = tuple[np.ndarray, np.ndarray]


def _check(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask, dtype=np.int32)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWxC uint8, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask


def _fill(fill: Fill, channels: int) -> tuple[int, ...]:
    return (fill,) * channels if isinstance(fill, (int, np.integer)) else tuple(fill)


def _warp(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray, fill: Fill, mask_fill: int,
          interpolation: int) -> Pair:
    """Apply one affine map to image and mask, on the same canvas.

    The mask is sampled by plain indexing at the nearest source pixel, and so is the image when
    ``interpolation`` is nearest: OpenCV's own nearest warp rounds half-pixel ties differently for
    ``int32`` than for ``uint8`` arrays, which put masks one pixel off their images; a shared
    index map makes the alignment exact by construction. Other interpolations use ``cv2.remap``
    on the same source coordinates.
    """
    h, w = mask.shape
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    ix, iy = np.floor(sx + 0.5).astype(np.int64), np.floor(sy + 0.5).astype(np.int64)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out_mask = np.full((h, w), mask_fill, dtype=np.int32)
    out_mask[inside] = mask[iy[inside], ix[inside]]
    if interpolation == cv2.INTER_NEAREST:
        out = np.empty_like(image)
        out[...] = np.asarray(_fill(fill, image.shape[2]), dtype=np.uint8)
        out[inside] = image[iy[inside], ix[inside]]
    else:
        out = cv2.remap(image, sx.astype(np.float32), sy.astype(np.float32), interpolation,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=_fill(fill, image.shape[2]))
    return out.reshape(image.shape), out_mask


def _centre(mask: np.ndarray) -> tuple[float, float]:
    h, w = mask.shape
    return (w - 1) / 2.0, (h - 1) / 2.0


def rotate(image: np.ndarray, mask: np.ndarray, degrees: float, fill: Fill = 0,
           mask_fill: int = IGNORE_ID, interpolation: int = cv2.INTER_LINEAR) -> Pair:
    """Rotate counter-clockwise by ``degrees`` about the image centre; the canvas is kept, so
    corners leave the frame and fill comes in."""
    image, mask = _check(image, mask)
    matrix = cv2.getRotationMatrix2D(_centre(mask), float(degrees), 1.0)
    return _warp(image, mask, matrix, fill, mask_fill, interpolation)


def _flip(image: np.ndarray, mask: np.ndarray, strength: float, code: int) -> Pair:
    image, mask = _check(image, mask)
    if not strength:
        return image.copy(), mask.copy()
    return cv2.flip(image, code).reshape(image.shape), cv2.flip(mask, code)


def hflip(image: np.ndarray, mask: np.ndarray, strength: float = 1, **_: Any) -> Pair:
    """Mirror left-right when ``strength`` is non-zero (a flip has no degree)."""
    return _flip(image, mask, strength, 1)


def vflip(image: np.ndarray, mask: np.ndarray, strength: float = 1, **_: Any) -> Pair:
    """Mirror top-bottom when ``strength`` is non-zero (a flip has no degree)."""
    return _flip(image, mask, strength, 0)


def scale(image: np.ndarray, mask: np.ndarray, factor: float, fill: Fill = 0,
          mask_fill: int = IGNORE_ID, interpolation: int = cv2.INTER_LINEAR) -> Pair:
    """Zoom by ``factor`` about the centre, keeping the canvas: objects change size while the
    image the U-Net sees keeps its resolution."""
    if factor <= 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    image, mask = _check(image, mask)
    matrix = cv2.getRotationMatrix2D(_centre(mask), 0.0, float(factor))
    return _warp(image, mask, matrix, fill, mask_fill, interpolation)


def pad(image: np.ndarray, mask: np.ndarray, fraction: float, fill: Fill = 0,
        mask_fill: int = IGNORE_ID, **_: Any) -> Pair:
    """Add a border of ``fraction x height`` (top, bottom) and ``fraction x width`` (left, right);
    once resized to the model's input, objects shrink and the context becomes fill."""
    if fraction < 0:
        raise ValueError(f"padding fraction must be >= 0, got {fraction}")
    image, mask = _check(image, mask)
    h, w = mask.shape
    dy, dx = int(round(fraction * h)), int(round(fraction * w))
    out = cv2.copyMakeBorder(image, dy, dy, dx, dx, cv2.BORDER_CONSTANT,
                             value=_fill(fill, image.shape[2]))
    out_mask = cv2.copyMakeBorder(mask, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=int(mask_fill))
    return out.reshape(out_mask.shape + image.shape[2:]), out_mask


def crop(image: np.ndarray, mask: np.ndarray, keep: float, **_: Any) -> Pair:
    """Keep the centred window of ``keep x height`` by ``keep x width`` (at least one pixel);
    objects near the border are cut or disappear."""
    if not 0 < keep <= 1:
        raise ValueError(f"crop keeps a fraction in (0, 1], got {keep}")
    image, mask = _check(image, mask)
    h, w = mask.shape
    ch, cw = max(1, int(round(keep * h))), max(1, int(round(keep * w)))
    top, left = (h - ch) // 2, (w - cw) // 2
    window = (slice(top, top + ch), slice(left, left + cw))
    return image[window].copy(), mask[window].copy()


def shift(image: np.ndarray, mask: np.ndarray, fraction: float | tuple[float, float],
          fill: Fill = 0, mask_fill: int = IGNORE_ID, **_: Any) -> Pair:
    """Translate right/down by ``fraction x width`` and ``fraction x height`` (negative: left/up),
    in whole pixels so the image is moved, not resampled; the canvas is kept."""
    fx, fy = (fraction, fraction) if np.isscalar(fraction) else fraction
    image, mask = _check(image, mask)
    h, w = mask.shape
    matrix = np.float64([[1, 0, round(fx * w)], [0, 1, round(fy * h)]])
    return _warp(image, mask, matrix, fill, mask_fill, cv2.INTER_NEAREST)


@dataclass(frozen=True)
class Transform:
    """A transform with the strengths a robustness sweep visits by default."""

    name: str
    apply: Callable[..., Pair]
    sweep: tuple[float, ...]
    identity: float

    def __call__(self, image: np.ndarray, mask: np.ndarray, strength: float, **kw: Any) -> Pair:
        return self.apply(image, mask, strength, **kw)


TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform("rotation", rotate, (0, 15, 30, 45, 60, 75, 90), 0),
    Transform("hflip", hflip, (0, 1), 0),
    Transform("vflip", vflip, (0, 1), 0),
    Transform("scale", scale, (0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5), 1.0),
    Transform("padding", pad, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), 0.0),
    Transform("crop", crop, (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), 1.0),
    Transform("shift", shift, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), 0.0),
)}


def get(name: str) -> Transform:
    """A transform by name; an unknown name fails listing the valid ones."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; valid: {', '.join(TRANSFORMS)}") from None
