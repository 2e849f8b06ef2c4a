"""Classical labelers that need no weights: they make the demo and the tests run anywhere.

Their labels are crude on purpose (they stand in for TRACER / MiDaS / Intrinsic); what matters
is that they are deterministic, fast, and have the same contract as the neural labelers.
"""
from __future__ import annotations

import cv2
import numpy as np

from probes.labels.base import Labeler, register_labeler


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _luminance(images: np.ndarray) -> np.ndarray:
    rgb = _srgb_to_linear(images.astype(np.float32) / 255.0)
    return (rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)).astype(np.float32)


@register_labeler("otsu")
class OtsuForeground(Labeler):
    """Foreground = the Otsu class of the blurred grey image that sits closer to the centre.

    The centre prior picks between "bright object on dark ground" and the reverse, which Otsu
    alone cannot tell apart. Output is 0/1, so the foreground task's ``label > 0`` rule applies.
    """

    batch_size = 64

    def __init__(self, blur: int = 5, **kwargs) -> None:
        super().__init__(blur=blur, **kwargs)
        self.blur = blur

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(images.shape[:3], np.float32)
        h, w = images.shape[1:3]
        yy, xx = np.mgrid[0:h, 0:w]
        dist = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)
        for i, img in enumerate(images):
            grey = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
            if self.blur > 1:
                grey = cv2.GaussianBlur(grey, (self.blur | 1, self.blur | 1), 0)
            _, bright = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            bright = bright.astype(bool)
            if bright.all() or not bright.any():
                out[i] = bright
                continue
            centre_is_bright = dist[bright].mean() <= dist[~bright].mean()
            out[i] = bright if centre_is_bright else ~bright
        return out


@register_labeler("luminance")
class LuminanceShading(Labeler):
    """Shading stand-in: blurred linear luminance (shading is the low-frequency part of it)."""

    batch_size = 64

    def __init__(self, blur: int = 9, **kwargs) -> None:
        super().__init__(blur=blur, **kwargs)
        self.blur = blur

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        lum = _luminance(images)
        if self.blur > 1:
            k = self.blur | 1
            lum = np.stack([cv2.GaussianBlur(x, (k, k), 0) for x in lum])
        return lum.astype(np.float32)


@register_labeler("vertical")
class VerticalDepthPrior(Labeler):
    """Depth stand-in: inverse depth grows towards the bottom of the frame (ground-plane prior),
    modulated by local contrast so that it is not identical for every image."""

    batch_size = 64

    def __init__(self, contrast_weight: float = 0.25, **kwargs) -> None:
        super().__init__(contrast_weight=contrast_weight, **kwargs)
        self.contrast_weight = contrast_weight

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        b, h, w = images.shape[:3]
        ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None].repeat(w, axis=1)
        lum = _luminance(images)
        out = np.empty((b, h, w), np.float32)
        k = max(3, (min(h, w) // 16) | 1)
        for i, x in enumerate(lum):
            mean = cv2.blur(x, (k, k))
            contrast = np.sqrt(np.maximum(cv2.blur(x * x, (k, k)) - mean * mean, 0.0))
            contrast = contrast / (contrast.max() + 1e-6)
            out[i] = ramp + self.contrast_weight * contrast
        return out
