"""Do the toy model's samples look like the world? Measured with the toy world's own models.

Two numbers the issue asks of the trained model, on images it generated (which have no ground
truth): the share of scenes in which the toy foreground labeler finds an object, and the share
in which the toy classifier's most confident shape is one the caption names — the toy world's
version of "an ImageNet classifier recognises the prompt's class".
"""
from __future__ import annotations

import numpy as np

from probes.labels.toy_nets import predict
from probes.toy.world import SHAPES

#: a generated scene "has an object" when the foreground labeler marks at least this many pixels
MIN_OBJECT_PIXELS = 8


def caption_classes(caption: str) -> set[int]:
    """Indices (into SHAPES) of the shapes a caption names."""
    words = caption.replace(",", " ").split()
    return {k for k, s in enumerate(SHAPES) if s in words}


def quality_per_image(images: np.ndarray, captions: list[str], weights_dir=None) -> dict[str, np.ndarray]:
    """Per image: ``object_found`` and ``class_named`` (0/1), and ``chance``: the probability that a shape
    drawn at random is one the caption names (the rate ``class_named`` has with no knowledge at all)."""
    fg = predict("foreground", images, weights_dir) > 0.5
    found = fg.reshape(len(images), -1).sum(1) >= MIN_OBJECT_PIXELS
    probs = predict("classifier", images, weights_dir)
    top = probs.argmax(1)
    named = np.array([int(t) in caption_classes(c) for t, c in zip(top, captions)])
    chance = np.array([len(caption_classes(c)) / len(SHAPES) for c in captions])
    return {"object_found": found.astype(float), "class_named": named.astype(float), "chance": chance}


def sample_quality(images: np.ndarray, captions: list[str], weights_dir=None) -> dict[str, float]:
    """``object_found``: share of images where foreground covers >= MIN_OBJECT_PIXELS pixels;
    ``class_named``: share where the classifier's top shape is named in the caption; ``chance``: the
    share ``class_named`` would have by chance."""
    q = quality_per_image(images, captions, weights_dir)
    return {"images": float(len(images)), **{k: float(v.mean()) for k, v in q.items()}}


def store_sample_quality(store, indices=None, weights_dir=None) -> dict[str, float]:
    """The same, for the (committed) images of an activation store."""
    q = store_quality_per_image(store, indices, weights_dir)
    return {"images": float(len(q["chance"])), **{k: float(v.mean()) for k, v in q.items()}}


def store_quality_per_image(store, indices=None, weights_dir=None) -> dict[str, np.ndarray]:
    """:func:`quality_per_image` of the (committed) images of an activation store."""
    idx = sorted(store.commits.done()) if indices is None else list(indices)
    images = np.stack([np.asarray(store.image(i)) for i in idx])
    prompts = [store.manifest["prompts"][i]["prompt"] for i in idx]
    return quality_per_image(images, prompts, weights_dir)
