"""Exact labels of the toy world's renders: the renderer's own maps, for stores of renders.

Why: a store made with ``generation.start=renders`` (:mod:`probes.generation.renders`) holds, as each
sample's image, the render of the record's scene, so that scene's labels are exact; probing against
them says what the model knows without a pseudo-labeler's errors in between. The labeler labels by
the record, not the pixels: :meth:`ToyExact.bind` reads which scene each store index holds from the
store's manifest, and refuses a store of sampled images (their pixels are not the scene's).

Maps follow the toy pseudo-labelers' conventions, so the two protocols train and score the same
targets: foreground 0/1; depth as per-image z-scored inverse depth (near is large, MiDaS's
convention, what ``toy_depth`` predicts); shading as the renderer's grey-level shading.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from probes.labels.base import Labeler, register_labeler
from probes.store.activations import ActivationStore
from probes.toy.prompts import scene_of
from probes.toy.world import render

KINDS = ("foreground", "depth", "shading")


def exact_map(source_id: str, kind: str, size: int) -> np.ndarray:
    """The ``kind`` label of the scene ``source_id`` names, rendered at ``size`` px, float32 ``[size, size]``."""
    r = render(scene_of(source_id), size)
    if kind == "foreground":
        return r.foreground.astype(np.float32)
    if kind == "depth":
        inv = r.inv_depth.astype(np.float64)
        return ((inv - inv.mean()) / max(float(inv.std()), 1e-6)).astype(np.float32)
    return r.shading.astype(np.float32)


@register_labeler("toy_exact")
class ToyExact(Labeler):
    """The renderer's ``kind`` map (``foreground``, ``depth`` or ``shading``) of each sample's scene."""

    batch_size = 64

    def __init__(self, kind: str, **kwargs: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"toy_exact labeler: kind={kind!r} is not one of {', '.join(KINDS)} "
                             f"(data.labels.<task>.kind)")
        super().__init__(kind=kind, **kwargs)
        self.kind = kind
        self.scenes: list[str] | None = None

    def bind(self, store: ActivationStore) -> None:
        start = store.manifest["generation"].get("start", "noise")
        if start != "renders":
            raise ValueError(f"the toy_exact labeler labels the scenes a store of renders was made from; the store "
                             f"at {store.root} was sampled (generation.start={start}), so its images are not those "
                             f"scenes. Use generation.start=renders (configs/toy/exact.yaml), or the toy "
                             f"pseudo-labelers (configs/labels/toy.yaml) for sampled images")
        self.scenes = [str(p.get("source_id", "")) for p in store.manifest["prompts"]]

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        if indices is None or self.scenes is None:
            raise ValueError("the toy_exact labeler labels store samples by index: it runs through the label cache "
                             "(bind(store), then store indices), not on loose images")
        size = images.shape[1]
        return np.stack([exact_map(self.scenes[int(i)], self.kind, size) for i in indices])
