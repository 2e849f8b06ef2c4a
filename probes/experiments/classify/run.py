"""Run a classifier on every step's decoded image and score it against the prompts' classes."""
from __future__ import annotations

import numpy as np
import torch

from probes.experiments.classify.metrics import step_scores
from probes.experiments.classify.models import ImageClassifier


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
