"""Labels supplied by the user as files, one per image (PNG or NPY), e.g. from an external tool."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from probes.labels.base import Labeler, register_labeler


@register_labeler("files")
class FileLabeler(Labeler):
    """Reads ``root / pattern.format(index=i)`` for store index ``i``.

    PNGs are read as single-channel values (0..255 for 8-bit, 0..65535 for 16-bit; not rescaled,
    so a saliency PNG keeps the reference's ``> 0`` rule). Maps of another size are resized to the
    image size: nearest for integer-valued maps (masks must stay binary), bicubic for float maps.
    """

    batch_size = 64

    def __init__(self, root: str, pattern: str = "{index:06d}.png", **kwargs) -> None:
        super().__init__(root=root, pattern=pattern, **kwargs)
        self.root = Path(root).expanduser()
        self.pattern = pattern

    def cache_kwargs(self) -> dict:
        # Key the cache on the resolved folder, so two relative spellings share one cache entry.
        kw = super().cache_kwargs()
        kw["root"] = str(self.root.resolve())
        return kw

    def path_for(self, index: int) -> Path:
        return self.root / self.pattern.format(index=int(index))

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        if indices is None:
            raise ValueError("the 'files' labeler needs the store indices of the images")
        h, w = images.shape[1:3]
        out = np.empty((len(images), h, w), np.float32)
        for k, idx in enumerate(indices):
            path = self.path_for(idx)
            if not path.exists():
                raise FileNotFoundError(
                    f"label file for image {idx} not found: {path} "
                    f"(labeler 'files' reads root={str(self.root)!r}, pattern={self.pattern!r})")
            if path.suffix == ".npy":
                arr = np.load(path)
            else:
                arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                if arr is None:
                    raise ValueError(f"could not decode label image {path}")
                if arr.ndim == 3:
                    arr = arr[..., 0]
            arr = np.asarray(arr)
            if arr.ndim != 2:
                raise ValueError(f"label map {path} has shape {arr.shape}; expected a 2-D (H, W) map")
            if arr.shape != (h, w):
                interp = cv2.INTER_NEAREST if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool else cv2.INTER_CUBIC
                arr = cv2.resize(arr.astype(np.float32), (w, h), interpolation=interp)
            out[k] = arr
        return out
