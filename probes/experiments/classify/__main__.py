"""``python -m probes.experiments.classify --images decoded.npy --labels labels.npy``: per-step classifier scores.

``decoded.npy`` holds uint8 images ``[N, S, H, W, 3]`` (S decoded steps per image), ``labels.npy``
(or a ``.txt``/``.csv`` of integers) the class index of each image's prompt. Prints one row per
step: top-1, top-5 and the mean probability of the prompt's class.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from probes.experiments.classify.models import DEFAULT_CLASSIFIER, VIEWS, load_classifier
from probes.experiments.classify.run import score_steps


def _labels(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    return np.array([int(v) for v in path.read_text().replace(",", " ").split()], dtype=np.int64)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, required=True, help="uint8 .npy [N, S, H, W, 3]")
    p.add_argument("--labels", type=Path, required=True, help=".npy or text file of N class indices")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="torchvision:<model>, timm:<model> or toy")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, a weights name or file; 'none' for random")
    p.add_argument("--view", default="full", choices=VIEWS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=16)
    a = p.parse_args(argv)
    images = np.load(a.images, mmap_mode="r")
    labels = _labels(a.labels)
    if len(labels) != len(images):        # checked before the classifier is loaded
        raise SystemExit(f"{a.labels} holds {len(labels)} labels but {a.images} holds {len(images)} images")
    weights = None if a.weights.lower() == "none" else a.weights
    clf = load_classifier(a.classifier, weights, a.device, view=a.view, batch_size=a.batch_size)
    scores = score_steps(clf, images, labels, progress=True)
    print("step  top1   top5   prob")
    for s in range(images.shape[1]):
        print(f"{s:>4}  {scores['top1'][s]:.3f}  {scores['top5'][s]:.3f}  {scores['prob'][s]:.3f}")


if __name__ == "__main__":
    main()
