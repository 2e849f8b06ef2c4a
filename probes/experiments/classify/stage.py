"""The replication's classifier experiment inside the probe run: a classifier on every step's
decoded image of the test split, scored against the prompts' classes.

Why here: the replication's claim is a comparison of *when* — probes read the scene from step ~3,
an ImageNet VGG-16 on the decoded images finds the prompt's class only from step ~11 of 15 — so the
classifier's per-step scores belong in the same ``metrics.csv``, report and W&B run as the probes.
It reads the images the labelers read (the store's decoded latent: the noisy x_{t-1} by default),
and writes rows with task ``classification``, pseudo-layer ``classifier_noisy`` / ``classifier_x0``
and metrics ``top1``, ``top5``, ``prob`` (``probes.experiments.classify.metrics``) at every captured step.

Configured as ``data.classifier`` (a mapping, or a group file ``configs/classifier/*.yaml``):
``name`` plus the arguments of :func:`probes.experiments.classify.models.load_classifier`.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from probes.metrics.baseline_rows import CLASSIFICATION, CLASSIFIER


def classifier_config(cfg: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    """``data.classifier`` as a checked dict (``name`` + ``load_classifier`` arguments), or None.

    A path is a group file holding that mapping. The name and the keys are checked here, when the
    config is parsed, so a misspelt classifier fails before any generation.
    """
    if cfg is None:
        return None
    if isinstance(cfg, (str, os.PathLike)):
        cfg = yaml.safe_load(Path(cfg).read_text())
    if not isinstance(cfg, Mapping) or not cfg.get("name"):
        raise ValueError(f"data.classifier must be a mapping with a 'name' (e.g. torchvision:vgg16, timm:<model>, "
                         f"toy), or a file holding one (configs/classifier/*.yaml); got {cfg!r}")
    from probes.experiments.classify.models import load_classifier, parse_name

    parse_name(str(cfg["name"]))
    allowed = set(inspect.signature(load_classifier).parameters) - {"device"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"data.classifier has unknown keys {unknown}; valid: {sorted(allowed)}")
    return dict(cfg)


def check_classifier_data(cfg: Mapping[str, Any] | None, decode: str, records: Sequence[Any]) -> None:
    """Refuse, before any compute, a classifier that would have nothing to score.

    It needs decoded intermediate images (``generation.decode``) and test prompts with a class
    (``PromptRecord.label``, the CSV column ``class_index``).
    """
    if not cfg:
        return
    if decode == "none":
        raise ValueError(f"data.classifier ({cfg['name']}) runs on the images decoded at every step, but "
                         f"data.generation.decode is 'none': set data.generation.decode: noisy (the noisy latent "
                         f"x_(t-1), as the replication) or x0")
    test = [r for r in records if r.split == "test"]
    if not any(getattr(r, "label", None) is not None for r in test):
        raise ValueError(f"data.classifier ({cfg['name']}) scores each image against its prompt's class, but none "
                         f"of the {len(test)} test prompts has one: use a prompt CSV with a 'class_index' column "
                         f"(e.g. data.prompts.source: data/prompts/imagenet_fruit.csv, or toy_classes for the toy "
                         f"classifier), or remove data.classifier")


@torch.no_grad()
def classifier_rows(dm, split: str = "test", chunk: int = 8) -> list[dict]:
    """Metric rows of the configured classifier on the decoded images of ``split`` (empty if none).

    Images whose prompt has no class are left out. Read ``chunk`` images (x steps) at a time: the
    decoded images of SD v1.4's test split are 4.4 GB.
    """
    from probes.experiments.classify.metrics import step_scores
    from probes.experiments.classify.models import load_classifier
    from probes.experiments.classify.run import classify_steps

    cfg = getattr(dm, "classifier", None)
    store, ds = dm.store, dm.datasets.get(split)
    if not cfg or store is None or store.decoded_images is None or ds is None:
        return []
    by_index = {r.index: r for r in dm.records()}
    idx = [int(i) for i in ds.indices if by_index[int(i)].label is not None]
    if not idx:
        return []
    clf = load_classifier(device=dm._device(), **cfg)
    images = store.decoded_images.array()
    probs = []
    for k in tqdm(range(0, len(idx), chunk), desc=f"classifier ({clf.name}) on decoded {store.decoded} images",
                  unit="batch", disable=not getattr(dm, "progress", False), dynamic_ncols=True):
        probs.append(classify_steps(clf, np.asarray(images[idx[k:k + chunk]])))
    scores = step_scores(torch.cat(probs), [by_index[i].label for i in idx])
    cap = store.manifest["capture"]
    layer = CLASSIFIER[store.decoded]
    return [{"split": split, "task": CLASSIFICATION, "layer": layer, "step": step, "timestep": cap["timesteps"][si],
             "metric": metric, "value": float(values[si])}
            for metric, values in scores.items() for si, step in enumerate(cap["steps"])]
