"""Labels supplied by the user as files, one per image (PNG or NPY), e.g. from an external tool."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from probes.labels.base import Labeler, register_labeler

#: explicit conversions of a multi-channel label image to one value per pixel
CHANNELS = ("red", "green", "blue", "alpha", "luma", "max")


def _single_channel(arr: np.ndarray, path: Path, channel: str | None) -> np.ndarray:
    """``[H, W, C]`` RGB(A) -> ``[H, W]``, refusing to guess when the channels disagree.

    A colour mask has its information in one channel; silently taking any fixed channel (OpenCV
    order made it blue) turns a red mask into an empty one, and an empty mask scores a "perfect"
    Dice. So without an explicit ``channel`` the colour channels must be equal (a grey image saved
    as RGB) and the alpha channel, if any, constant.
    """
    if arr.shape[-1] not in (3, 4):
        raise ValueError(f"label image {path} has {arr.shape[-1]} channels; expected a single-channel map "
                         f"(or RGB/RGBA with data.labels.<task>.channel set)")
    rgb, alpha = arr[..., :3], (arr[..., 3] if arr.shape[-1] == 4 else None)
    if channel == "alpha":
        if alpha is None:
            raise ValueError(f"label image {path} has no alpha channel, but channel: alpha was asked for")
        return alpha
    if channel in ("red", "green", "blue"):
        return rgb[..., ("red", "green", "blue").index(channel)]
    if channel == "luma":  # ITU-R BT.601, as cv2.cvtColor(..., COLOR_RGB2GRAY)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if channel == "max":
        return rgb.max(axis=-1)
    fix = ("Save the masks single-channel (grayscale), or say which channel holds the labels: "
           "data.labels.<task>.channel: red | green | blue | alpha | luma | max (max: any non-zero colour)")
    same = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    if not same:
        means = ", ".join(f"{c}={rgb[..., k].mean():.1f}" for k, c in enumerate(("red", "green", "blue")))
        raise ValueError(f"label image {path} is a colour image whose channels differ (mean {means}), so "
                         f"which one holds the labels is ambiguous. {fix}")
    if alpha is not None and alpha.min() != alpha.max():
        raise ValueError(f"label image {path} has a varying alpha channel (values {int(alpha.min())}..{int(alpha.max())}) "
                         f"while its colour channels are grey: is the mask in the alpha channel? {fix}")
    return rgb[..., 0]


@register_labeler("files")
class FileLabeler(Labeler):
    """Reads ``root / pattern.format(index=i)`` for store index ``i``.

    PNGs are read as single-channel values (0..255 for 8-bit, 0..65535 for 16-bit; not rescaled,
    so a saliency PNG keeps the reference's ``> 0`` rule). An RGB(A) PNG (or an ``[H, W, C]`` NPY,
    RGB order) is accepted when its colour channels are equal (grey saved as colour) and its alpha
    constant; a colour mask needs ``channel``: ``red``, ``green``, ``blue``, ``alpha``, ``luma``
    (BT.601 grey) or ``max`` (the largest channel: any non-zero colour counts). Maps of another
    size are resized to the image size: nearest for integer-valued maps (masks must stay binary),
    bicubic for float maps.
    """

    # 2: colour PNGs were read from their blue channel (OpenCV's BGR order); now refused or converted
    version = "2"
    batch_size = 64

    def __init__(self, root: str, pattern: str = "{index:06d}.png", channel: str | None = None, **kwargs: Any) -> None:
        if channel is not None and channel not in CHANNELS:
            raise ValueError(f"files labeler: channel={channel!r} is not one of {', '.join(CHANNELS)}")
        if channel is not None:  # only when given, so caches of single-channel files keep their key
            kwargs["channel"] = channel
        super().__init__(root=root, pattern=pattern, **kwargs)
        self.root = Path(root).expanduser()
        self.pattern = pattern
        self.channel = channel

    def cache_kwargs(self) -> dict:
        # Key the cache on the resolved folder, so two relative spellings share one cache entry.
        kw = super().cache_kwargs()
        kw["root"] = str(self.root.resolve())
        return kw

    def path_for(self, index: int) -> Path:
        return self.root / self.pattern.format(index=int(index))

    def read(self, index: int) -> np.ndarray:
        """The label map of store index ``index`` as a 2-D array, at the file's own size."""
        path = self.path_for(index)
        if not path.exists():
            raise FileNotFoundError(
                f"label file for image {index} not found: {path} "
                f"(labeler 'files' reads root={str(self.root)!r}, pattern={self.pattern!r})")
        if path.suffix == ".npy":
            arr = np.load(path)
        else:
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError(f"could not decode label image {path}")
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # OpenCV gives BGR(A); below speaks RGB(A)
                arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if arr.shape[-1] == 4 else cv2.COLOR_BGR2RGB)
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 3:
            arr = _single_channel(arr, path, self.channel)
        if arr.ndim != 2:
            raise ValueError(f"label map {path} has shape {arr.shape}; expected a 2-D (H, W) map")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"label map {path} (image {index}) holds {bad} non-finite value(s) (NaN or inf); "
                             f"fix or regenerate that file")
        return arr

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        if indices is None:
            raise ValueError("the 'files' labeler needs the store indices of the images")
        h, w = images.shape[1:3]
        out = np.empty((len(images), h, w), np.float32)
        for k, idx in enumerate(indices):
            arr = self.read(int(idx))
            if arr.shape != (h, w):
                interp = cv2.INTER_NEAREST if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool else cv2.INTER_CUBIC
                arr = cv2.resize(arr.astype(np.float32), (w, h), interpolation=interp)
            out[k] = arr
        return out
