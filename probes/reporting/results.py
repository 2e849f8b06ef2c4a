"""What a finished test computed, gathered before anything is written.

The run's outputs callback (:mod:`.run_outputs`) only writes; every number and map it writes is
computed here, from the trained module, the data module and the run's other stages: the probes'
val/test rows, the labeler on decoded images and the position baselines (the prior map and the
plane, :mod:`probes.metrics`), the gain over position of every head (``with_prior`` minus the
prior's score, the ``gain`` column), rows an experiment stage added (callbacks with
``result_rows``, e.g. the classifier), the best heads picked on validation, the per-image test
scores every interval is computed from, the export (:func:`probes.export.probeset.build_export`,
with the stages' ``export_record``) and the prediction panels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.export.probeset import ProbeExport, build_export
from probes.metrics.decoded import decoded_rows
from probes.metrics.image_scores import aligned_depth_metrics
from probes.metrics.per_image import PerImageScores
from probes.metrics.prior_map import PRIOR
from probes.reporting.panels import build_panels
from probes.reporting.tables import best_heads
from probes.tasks import get_task
from probes.training.position import position_scores, target_chunks


@dataclass
class RunResults:
    """Everything the outputs of one tested run are made of."""

    rows: list[dict]
    best: list[dict]
    summary: dict[str, Any]
    export: ProbeExport | None = None
    panels: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_image: PerImageScores | None = None


def stage_rows(stages: Sequence[Any]) -> list[dict]:
    """Rows other stages of the run computed (``result_rows`` of callbacks such as the classifier)."""
    return [r for s in stages for r in (getattr(s, "result_rows", None) or [])]


def stage_records(stages: Sequence[Any]) -> dict[str, Any]:
    """What those stages ask the export to record (``export_record``), merged."""
    out: dict[str, Any] = {}
    for s in stages:
        out.update(getattr(s, "export_record", None) or {})
    return out


def collect_results(module: Any, dm: Any = None, stages: Sequence[Any] = (), export: bool = True,
                    panels: int = 0, panel_acts: dict[int, dict[str, Any]] | None = None) -> RunResults:
    """The rows, best heads, summary, export and panels of a tested ``module`` (see the module docstring).

    :param dm: the data module (None: only the module's own rows).
    :param stages: the run's other stages (the trainer's callbacks).
    :param panels: validation images per prediction panel (0: none).
    :param panel_acts: activations of the panel images kept while a streamed split went by.
    """
    rows = [dict(r) for split in ("val", "test") for r in module.results.get(split, [])]
    per_image = getattr(module, "per_image", None)
    if dm is not None:
        decoded: dict[str, tuple[list[int], np.ndarray]] = {}
        rows += decoded_rows(module, dm, per_image=decoded)   # the labeler on decoded intermediate images, per step
        rows += stage_rows(stages)                            # e.g. the classifier on the same images, per step
        rows += position_rows(module, dm, per_image)          # what the pixel's position alone predicts
        add_gain(rows)
        if per_image is not None:
            for t, (idx, vals) in decoded.items():
                per_image.arrays[f"{t}/decoded"] = np.moveaxis(reorder(vals, idx, per_image.index), 0, -1).transpose(1, 0, 2)
            # which labelers made the labels and the decoded images' labels (the same one: that curve ends at
            # 1 by construction); read off the caches the scores came from
            caches, dec = getattr(dm, "label_caches", {}), getattr(dm, "decoded_label_caches", {})
            per_image.info["labeler"] = {t: caches[t].labeler.name for t in decoded if t in caches}
            per_image.info["decoded_labeler"] = {t: dec[t].labeler.name for t in decoded if t in dec}
    spec = module.spec
    best = best_heads(rows)
    summary = {"model": spec.model, "is_random": spec.is_random, "store_dir": spec.store_dir, "best": best,
               "num_probes": len(module.banks) * len(spec.layers) * len(spec.steps)}
    probes = build_export(module, extra={"best": best, **stage_records(stages)}) if export else None
    shown = {}
    if panels and dm is not None and getattr(dm, "store", None) is not None:
        shown = build_panels(module, dm, best, panels, panel_acts)
    return RunResults(rows, best, summary, probes, shown, per_image)


def reorder(values: np.ndarray, indices: list[int], order: np.ndarray) -> np.ndarray:
    """Rows of ``values`` (one per index of ``indices``) in the order of the store indices ``order``."""
    where = {int(i): k for k, i in enumerate(indices)}
    missing = [int(i) for i in order if int(i) not in where]
    if missing:
        raise ValueError(f"per-image scores lack test images {missing[:5]}: the splits differ between stages")
    return values[[where[int(i)] for i in order]]


def position_rows(module: Any, dm: Any, per_image: PerImageScores | None = None) -> list[dict]:
    """Rows of the position baselines (pseudo-layers ``prior`` and ``plane``) on val and test, repeated at
    every step; their per-image test scores (and aligned depth metrics) go into ``per_image``."""
    if not getattr(dm, "label_caches", None) or "train" not in getattr(dm, "datasets", {}):
        return []
    module.ensure_position(dm)
    spec, rows = module.spec, []
    for split in ("val", "test"):
        idx, scores = position_scores(module.targets, dm, module.position, split)
        if not idx:
            continue
        for t, per in scores.items():
            task = get_task(t)
            for name, vals in per.items():
                means = vals.mean(0)
                for mi, metric in enumerate(task.metrics):
                    for si, step in enumerate(spec.steps):
                        rows.append({"split": split, "task": t, "layer": name, "step": step,
                                     "timestep": spec.timesteps[si], "metric": metric, "value": float(means[mi])})
                if split == "test" and per_image is not None:
                    per_image.arrays[f"{t}/{name}"] = reorder(vals, idx, per_image.index).T
        if split == "test" and per_image is not None:
            for t, space in spec.label_spaces.items():
                if t in module.position:
                    per_image.arrays.update(aligned_baselines(module, dm, t, space, idx, per_image.index))
    return rows


def aligned_baselines(module: Any, dm: Any, task: str, space: str, idx: list[int],
                      order: np.ndarray) -> dict[str, np.ndarray]:
    """AbsRel, RMSE and δ<1.25 ``[3, N]`` of each position baseline against the raw test labels."""
    labels = dm.label_caches[task].array()
    out = {}
    for name, b in module.position[task].items():
        parts = []
        for sel, _ in target_chunks(module.targets, get_task(task), labels, idx):
            raw = np.stack([np.asarray(labels[i], dtype=np.float64) for i in sel])
            a = aligned_depth_metrics(np.broadcast_to(b.map, raw.shape), raw, space=space)
            parts.append(np.stack([a.abs_rel, a.rmse, a.delta1], -1))
        out[f"{task}/aligned/{name}"] = reorder(np.concatenate(parts), idx, order).T
    return out


def add_gain(rows: list[dict]) -> None:
    """``gain = with_prior - prior`` on every probe row that has an activation+prior score (same split,
    task and metric; the prior has one score per split)."""
    prior = {(r["split"], r["task"], r["metric"]): r["value"] for r in rows if r["layer"] == PRIOR}
    for r in rows:
        p = prior.get((r["split"], r["task"], r["metric"]))
        if "with_prior" in r and p is not None and r["metric"] not in ("loss", "ridge_lambda"):
            r["gain"] = r["with_prior"] - p
