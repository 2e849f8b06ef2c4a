"""The replication's classifier experiment inside a probe run: a classifier on every step's decoded
image of the test split, scored against the prompts' classes.

Why in the probe run: the replication's claim is a comparison of *when* — probes read the scene
from step ~3, an ImageNet VGG-16 on the decoded images finds the prompt's class only from step ~11
of 15 — so the classifier's per-step scores belong in the same ``metrics.csv``, report and W&B run
as the probes. It reads the images the labelers read (the store's decoded latent: the noisy
x_{t-1} by default), and writes rows with task ``classification``, pseudo-layer
``classifier_noisy`` / ``classifier_x0`` and metrics ``top1``, ``top5``, ``prob``
(``probes.experiments.classify.metrics``) at every captured step.

Why a callback: the experiment reads what the data stages made and adds rows to the run's results;
the data module and the probes never know it is there. Configured as the run's ``classifier``
group (``classifier: configs/classifier/{vgg16,toy}.yaml``): ``name`` plus the arguments of
:func:`probes.experiments.classify.models.load_classifier`. The callback hands its rows on as
``result_rows`` and its settings as ``export_record`` (the run's outputs write both; evaluating an
export runs the classifier again).
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml

from probes.common.progress import progress_bar
from probes.metrics.baseline_rows import CLASSIFICATION, CLASSIFIER

#: the config key the classifier's settings live under (named in errors)
KEY = "classifier"


def classifier_config(cfg: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    """The classifier's settings as a checked dict (``name`` + ``load_classifier`` arguments), or None.

    A path is a group file holding that mapping. The name and the keys are checked here, when the
    config is read, so a misspelt classifier fails before any generation.
    """
    if cfg is None:
        return None
    if isinstance(cfg, (str, os.PathLike)):
        cfg = yaml.safe_load(Path(cfg).read_text())
    if not isinstance(cfg, Mapping) or not cfg.get("name"):
        raise ValueError(f"{KEY} must be a mapping with a 'name' (e.g. torchvision:vgg16, timm:<model>, toy), or "
                         f"a file holding one (configs/classifier/*.yaml); got {cfg!r}")
    from probes.experiments.classify.models import load_classifier, parse_name

    parse_name(str(cfg["name"]))
    allowed = set(inspect.signature(load_classifier).parameters) - {"device"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{KEY} has unknown keys {unknown}; valid: {sorted(allowed)}")
    return dict(cfg)


def check_classifier_data(cfg: Mapping[str, Any] | None, decode: str, records: Sequence[Any]) -> None:
    """Refuse, before any compute, a classifier that would have nothing to score.

    It needs decoded intermediate images (``generation.decode``) and test prompts with a class
    (``PromptRecord.label``, the CSV column ``class_index``).
    """
    if not cfg:
        return
    if decode == "none":
        raise ValueError(f"{KEY} ({cfg['name']}) runs on the images decoded at every step, but "
                         f"data.generation.decode is 'none': set data.generation.decode: noisy (the noisy latent "
                         f"x_(t-1), as the replication) or x0")
    test = [r for r in records if r.split == "test"]
    if not any(getattr(r, "label", None) is not None for r in test):
        raise ValueError(f"{KEY} ({cfg['name']}) scores each image against its prompt's class, but none "
                         f"of the {len(test)} test prompts has one: use a prompt CSV with a 'class_index' column "
                         f"(e.g. data.prompts.source: data/prompts/imagenet_fruit.csv, or toy_classes for the toy "
                         f"classifier), or remove {KEY}")


@torch.no_grad()
def classifier_rows(cfg: Mapping[str, Any] | None, dm: Any, split: str = "test", chunk: int = 8) -> list[dict]:
    """Metric rows of the classifier ``cfg`` on the decoded images of ``dm``'s ``split`` (empty if none).

    Images whose prompt has no class are left out. Read ``chunk`` images (x steps) at a time: the
    decoded images of SD v1.4's test split are 4.4 GB.
    """
    from probes.experiments.classify.metrics import step_scores
    from probes.experiments.classify.models import load_classifier
    from probes.experiments.classify.run import classify_steps

    store, ds = dm.store, dm.datasets.get(split)
    if not cfg or store is None or store.decoded_images is None or ds is None:
        return []
    by_index = {r.index: r for r in dm.records()}
    idx = [int(i) for i in ds.indices if by_index[int(i)].label is not None]
    if not idx:
        return []
    clf = load_classifier(device=dm._device(), **cfg)
    store.check_rows(f"{store.decoded}_images", idx)
    images = store.decoded_images.array()
    probs = []
    bar = progress_bar(len(range(0, len(idx), chunk)), f"classifier ({clf.name}) on decoded {store.decoded} images",
                       "batch", enabled=getattr(dm, "progress", False))
    for k in range(0, len(idx), chunk):
        probs.append(classify_steps(clf, np.asarray(images[idx[k:k + chunk]])))
        bar.update(1)
    bar.close()
    scores = step_scores(torch.cat(probs), [by_index[i].label for i in idx])
    cap = store.manifest["capture"]
    layer = CLASSIFIER[store.decoded]
    return [{"split": split, "task": CLASSIFICATION, "layer": layer, "step": step, "timestep": cap["timesteps"][si],
             "metric": metric, "value": float(values[si])}
            for metric, values in scores.items() for si, step in enumerate(cap["steps"])]


class ClassifierScores(pl.Callback):
    """The classifier experiment as a stage of the run (see the module docstring); inactive without ``name``.

    :param name: ``torchvision:<model>``, ``timm:<model>`` or ``toy``; None: no classifier.
    :param weights: ``DEFAULT``, a weights name or tag, a checkpoint file, or None (random weights).
    :param cache_dir: where the weights are looked for (see ``load_classifier``).
    :param view: ``full`` (the whole image resized, as the replication) or ``crop``.
    :param batch_size: images per forward pass.
    """

    def __init__(self, name: str | None = None, weights: str | None = "DEFAULT", cache_dir: str | None = None,
                 view: str = "full", batch_size: int = 16) -> None:
        cfg = {"name": name, "weights": weights, "view": view, "batch_size": batch_size}
        if cache_dir is not None:
            cfg["cache_dir"] = cache_dir
        self.config = classifier_config(cfg) if name else None   # the name checked now, before any compute
        if self.config is not None:
            from probes.experiments.classify.models import VIEWS

            if view not in VIEWS or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"{KEY}: view must be one of {VIEWS} and batch_size >= 1; got {view!r}, {batch_size!r}")
        #: the rows this stage computed for the run's results (set at the end of testing)
        self.result_rows: list[dict] = []

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | str | os.PathLike | None) -> ClassifierScores:
        """From a mapping or a group file (``configs/classifier/*.yaml``), keys checked."""
        checked = classifier_config(cfg)
        return cls(**checked) if checked else cls()

    @property
    def export_record(self) -> dict[str, Any]:
        """What a probe export records of this stage, so that evaluating the export runs it again."""
        return {KEY: self.config} if self.config else {}

    def check_data(self, dm: Any) -> None:
        """Refuse data this classifier cannot score (called by the data module before any compute)."""
        check_classifier_data(self.config, dm.generation.decode, dm.records())

    def prerequisites(self) -> list[Any]:
        """The classifier's missing weights, as ``probes.labels.base.Missing`` items (for the pre-flight check)."""
        if not self.config:
            return []
        from probes.experiments.classify.models import classifier_prerequisites

        c = self.config
        return classifier_prerequisites(c["name"], c.get("weights", "DEFAULT"), c.get("cache_dir"), where=KEY)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.result_rows = []
        dm = getattr(trainer, "datamodule", None)
        if self.config and dm is not None and trainer.is_global_zero:
            self.result_rows = classifier_rows(self.config, dm)
