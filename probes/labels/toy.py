"""Pseudo-labelers of the toy world: small CNNs trained on exact renders (``probes.labels.toy_nets``).

They play the parts TRACER, MiDaS and Intrinsic play for SD v1.4: generated images have no
ground truth, so a network trained on rendered images with exact labels labels them. Weights
ship in ``data/toy/labelers`` with a sha256 manifest (``make toy-model`` retrains them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probes.labels.base import Labeler, register_labeler
from probes.labels.toy_nets import WEIGHTS_DIR, predict, read_manifest


class _ToyLabeler(Labeler):
    kind = ""
    batch_size = 128

    def __init__(self, weights_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(weights_dir=weights_dir, **kwargs)
        self.weights_dir = Path(weights_dir) if weights_dir else None

    def cache_kwargs(self) -> dict[str, Any]:
        """The weights' sha256 names the labels: retrained weights never reuse stale labels."""
        root = self.weights_dir or WEIGHTS_DIR
        return {"weights_sha256": read_manifest(Path(root))}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return predict(self.kind, images, self.weights_dir)


@register_labeler("toy_foreground")
class ToyForeground(_ToyLabeler):
    """0/1 foreground (probability > 0.5), so the task's ``label > 0`` rule applies as to TRACER's."""

    kind = "foreground"

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        return (self.predict(images) > 0.5).astype(np.float32)


@register_labeler("toy_depth")
class ToyDepth(_ToyLabeler):
    """Relative inverse depth (near is large), MiDaS's convention."""

    kind = "depth"

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        return self.predict(images)


@register_labeler("toy_shading")
class ToyShading(_ToyLabeler):
    """Grey-level Lambertian shading."""

    kind = "shading"

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        return self.predict(images)
