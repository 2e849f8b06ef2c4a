"""Run a classifier on every step's decoded image and score it against the prompts' classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from probes.experiments.classify.metrics import step_scores
from probes.experiments.classify.models import DEFAULT_CLASSIFIER, VIEWS, ImageClassifier, load_classifier


def classify_steps(classifier: ImageClassifier, images: np.ndarray, progress: bool = False) -> torch.Tensor:
    """Probabilities ``[N, S, K]`` of decoded images ``[N, S, H, W, 3]`` (uint8; S steps per image)."""
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"expected decoded images [N images, S steps, H, W, 3], got shape {images.shape}")
    n, steps = images.shape[:2]
    probs = classifier(images.reshape(n * steps, *images.shape[2:]), progress=progress)
    return probs.reshape(n, steps, -1)


def score_steps(classifier: ImageClassifier, images: np.ndarray, labels: np.ndarray | list[int],
                progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`~probes.experiments.classify.metrics.step_scores` of ``classifier`` on decoded images ``[N, S, H, W, 3]``."""
    return step_scores(classify_steps(classifier, images, progress), labels)


def _labels(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    return np.array([int(v) for v in path.read_text().replace(",", " ").split()], dtype=np.int64)


def classify_saved(images: Path, labels: Path, classifier: str = DEFAULT_CLASSIFIER, weights: str = "DEFAULT",
                   view: str = "full", device: str = "cpu", batch_size: int = 16) -> dict[str, np.ndarray]:
    """``diffusion-probes classify``: per-step classifier scores of saved decoded images, one row per step.

    :param images: uint8 ``.npy`` ``[N, S, H, W, 3]`` (S decoded steps per image).
    :param labels: ``.npy`` or text file of N class indices (each image's prompt's class).
    :param classifier: ``torchvision:<model>``, ``timm:<model>`` or ``toy``.
    :param weights: ``DEFAULT``, a weights name or file; ``none`` for random weights.
    :param view: ``full`` or ``crop`` (see ``load_classifier``).
    :param device: where the classifier runs.
    :param batch_size: images per forward pass.
    """
    if view not in VIEWS:
        raise SystemExit(f"view {view!r} is not one of {VIEWS}")
    decoded = np.load(images, mmap_mode="r")
    classes = _labels(Path(labels))
    if len(classes) != len(decoded):        # checked before the classifier is loaded
        raise SystemExit(f"{labels} holds {len(classes)} labels but {images} holds {len(decoded)} images")
    clf = load_classifier(classifier, None if weights.lower() == "none" else weights, device, view=view,
                          batch_size=batch_size)
    scores = score_steps(clf, decoded, classes, progress=True)
    print("step  top1   top5   prob")
    for k in range(decoded.shape[1]):
        print(f"{k:>4}  {scores['top1'][k]:.3f}  {scores['top5'][k]:.3f}  {scores['prob'][k]:.3f}")
    return scores
