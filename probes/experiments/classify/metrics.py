"""Per-step scores of a classifier run on the image decoded after every denoising step.

Why: the replication's claim is about *when* the prompt's class becomes recognisable ("from step
~11 of 15"), so every score is a curve over steps: top-1 and top-5 accuracy against the prompt's
class (torchmetrics' multiclass accuracy, micro-averaged over images) and the mean probability
the classifier gives that class, which moves before the arg-max does.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy

SCORES: tuple[str, ...] = ("top1", "top5", "prob")


def step_scores(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | list[int]
                ) -> dict[str, np.ndarray]:
    """Scores per step of class probabilities ``[N, S, K]`` (N images, S steps, K classes).

    :param probs: probabilities (softmax or independent sigmoids; only their order matters for
        top-k).
    :param labels: ``[N]`` the class index of each image's prompt, in ``[0, K)``.
    :return: ``{"top1", "top5", "prob"}`` -> float64 ``[S]``; top-5 uses ``k = min(5, K)``.
    """
    p = torch.as_tensor(probs).float()
    y = torch.as_tensor(labels).long()
    if p.ndim != 3:
        raise ValueError(f"probs must be [N images, S steps, K classes], got shape {tuple(p.shape)}")
    n, steps, k = p.shape
    if y.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}] (one class per image), got shape {tuple(y.shape)}")
    if n == 0:
        raise ValueError("no images to score (probs has N = 0)")
    if y.min() < 0 or y.max() >= k:
        bad = y[(y < 0) | (y >= k)].unique().tolist()
        raise ValueError(f"labels {bad} are not class indices of a {k}-class classifier (0..{k - 1}); "
                         f"images without a class must be left out before scoring")
    top = min(5, k)
    out = {name: np.empty(steps, np.float64) for name in SCORES}
    for s in range(steps):
        ps = p[:, s]
        out["top1"][s] = multiclass_accuracy(ps, y, num_classes=k, top_k=1, average="micro").item()
        out["top5"][s] = multiclass_accuracy(ps, y, num_classes=k, top_k=top, average="micro").item()
        out["prob"][s] = ps[torch.arange(n), y].double().mean().item()
    return out
