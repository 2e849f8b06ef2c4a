"""What every lens dataset yields, and the file reading the loaders share.

An item is one image with its objects: ``image`` ``HxWx3 uint8`` RGB, ``instances`` ``HxW int32``
(0 background, :data:`~probes.experiments.lens.pooling.IGNORE_ID` void, else an instance id), ``classes``
``{instance_id: class_id or None}`` for the instances present in the mask, ``class_names``
``{class_id: name}`` (or None when the dataset has no classes) and a unique ``id``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image


class LensItem(TypedDict, total=False):
    image: np.ndarray
    instances: np.ndarray
    classes: dict[int, Any]
    class_names: dict[int, str] | None
    id: str
    annotation_ids: dict[int, int]   # COCO only: instance id -> annotation id
    sequence: str                    # DAVIS only
    frame: int                       # DAVIS only: index of the frame in its sequence


def require(path: Path, what: str, layout: str) -> Path:
    """``path`` if it exists; otherwise an error saying what was expected where, because a wrong
    root is the usual mistake and a bare "No such file" does not show the layout to fix it."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """An image as ``HxWx3 uint8`` RGB (grayscale and CMYK JPEGs exist in COCO)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_indexed_png(path: Path) -> np.ndarray:
    """The index values of a palette (or grayscale) PNG as ``int32``.

    VOC and DAVIS store ids as palette indices; converting such a PNG to RGB (as generic image
    readers do) would return palette colours instead of ids, so colour images are refused.
    """
    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: expected a palette/indexed PNG, got mode {img.mode!r}")
        return np.asarray(img, dtype=np.int32)
