"""``diffusion-probes intervene``: the causal test over a test split, with controls, report and video.

1. Load the export (a folder or a W&B artifact) and rebuild the recorded model, test prompts and
   labeler (:class:`~probes.experiments.intervention.session.InterventionSession`).
2. Generate and label the first ``images`` test images unedited (the originals).
3. Per image, draw the requested shift and build the targets of each condition (``edit``,
   ``noop``, ``random``; :mod:`~probes.experiments.intervention.targets`).
4. Regenerate each image once per condition with the editor active, re-label the result, score it
   (:mod:`~probes.experiments.intervention.score`).
5. Write ``metrics.csv`` (per-condition means, long form), ``per_image.csv`` (every image's
   scores, long form), ``report.md`` with one PNG grid per condition, and the moving-object video
   (MP4 + GIF); log them to W&B when asked (``wandb_project``) or when a run is already active.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from probes.experiments.intervention import score as scoring
from probes.experiments.intervention.editor import EditRecord, EditSettings, plan_edits
from probes.experiments.intervention.report import ConditionResult, ImageResult, write_grid, write_markdown
from probes.experiments.intervention.session import InterventionSession
from probes.experiments.intervention.targets import (
    PATH_KINDS,
    RANDOM_KINDS,
    TargetMaker,
    offset_path,
    random_source,
    sample_shift,
)
from probes.experiments.intervention.video import active_wandb_run, log_video, render_frames, write_video
from probes.export.probeset import LinearProbe, load_probes

CONDITIONS = ("edit", "noop", "random")
#: the reference's defaults: foreground edits the 9 decoder layers at steps 0-4, depth all 16 at steps 0-2
TASK_DEFAULTS: dict[str, dict[str, list]] = {
    "foreground": {"layers": ["up*"], "steps": [0, 1, 2, 3, 4]},
    "depth": {"layers": ["*"], "steps": [0, 1, 2]},
}
PER_IMAGE_COLUMNS = ["split", "index", "seed", "prompt", "condition", "metric", "value"]
SUMMARY_COLUMNS = ["split", "condition", "metric", "value"]


def write_rows(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _loss_scores(records: Sequence[EditRecord], k: int) -> dict[str, float]:
    """Image ``k``'s probe loss before and after optimisation, averaged over the edits."""
    if not records:
        return {}
    return {"probe_loss_before": float(np.mean([r.loss_before[k] for r in records])),
            "probe_loss_after": float(np.mean([r.loss_after[k] for r in records]))}


class _EditBar:
    """One progress bar over every edit of the run (an SD generation takes minutes of edits)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="intervening", unit="edit", disable=not enabled, dynamic_ncols=True)

    def __call__(self, record: EditRecord) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"step {record.step} {record.layer} loss {np.mean(record.loss_after):.3g}",
                                 refresh=False)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)

    def close(self) -> None:
        self.bar.close()


def _start_wandb(project: str | None, out: Path, settings: dict):
    """The W&B run to log into: a new one for ``project`` (offline without credentials), else the
    active one, else ``None``."""
    if project is None:
        return active_wandb_run(), False
    import wandb

    from probes.reporting.wandb_logger import wandb_api_key_available

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_available() else "offline")
    run = wandb.init(project=project, dir=str(out), mode=mode, job_type="intervention", config=settings)
    return run, True


def _log_wandb(run, summary: Sequence[dict], per_image: Sequence[dict], grids: dict[str, Path],
               video: dict[str, Path] | None) -> None:
    import wandb

    run.summary.update({f"intervention/{r['condition']}/{r['metric']}": r["value"] for r in summary})
    payload = {"intervention/per_image": wandb.Table(columns=PER_IMAGE_COLUMNS,
                                                     data=[[r[c] for c in PER_IMAGE_COLUMNS] for r in per_image])}
    payload.update({f"intervention/grid_{c}": wandb.Image(str(p)) for c, p in grids.items()})
    run.log(payload)
    if video:
        log_video(video, "intervention/video")


def intervene(probes: str, task: str = "foreground", layers: list[str] | None = None, steps: list[int] | None = None,
              iterations: int = 128, lr: float = 5e-3, huber_delta: float = 1.0, binary_loss: str = "auto",
              optimizer: str = "adam",
              conditions: list[str] | None = None, random_target: str = "other_image",
              value_range: tuple[float, float] | None = (-9.0, 9.0), images: int = 16, batch_size: int = 1,
              seed: int = 0, video: bool = True, video_path: str = "circle", video_frames: int = 16,
              video_extent: float = 105.0, fps: float = 8.0, grid_images: int = 8, out: str | None = None,
              prompts_dir: str | None = None, device: str = "auto", wandb_project: str | None = None,
              progress: bool = True) -> Path:
    """Edit activations so that the probes read a moved object, and measure whether the image follows.

    :param probes: probe export folder (probes.json + probes.safetensors) or W&B artifact
        reference ``entity/project/name:version``.
    :param task: the task whose probes edit (``foreground`` or ``depth``; any exported task).
    :param layers: layers to edit, names or patterns, in forward order (default per task: the 9
        decoder layers ``up*`` for foreground, all ``*`` for depth).
    :param steps: denoising steps to edit (default per task: 0-4 foreground, 0-2 depth).
    :param iterations: Adam iterations per edited (step, layer) (128; 0 reproduces the original).
    :param lr: Adam's learning rate on the activation (5e-3).
    :param huber_delta: regression tasks' Huber threshold in probe z-units (1).
    :param binary_loss: foreground's edit loss: ``auto`` (the loss the exported probes were fitted
        with: cross-entropy for SGD probes, as the reference; squared error on ±1 for ridge and
        mean-difference probes), ``cross_entropy`` or ``squared``.
    :param optimizer: ``adam`` (the reference's), ``sgd``, or ``projection`` (the smallest edit after
        which the probe reads the target: closed form, no iterations; see ``EditSettings``).
    :param conditions: any of ``edit``, ``noop``, ``random`` (default: all three).
    :param random_target: the random control's target: ``other_image`` (another test image's label)
        or ``random_shift`` (this image's label moved by an independent shift).
    :param value_range: regression targets are rescaled to this range in z-units (reference
        [-9, 9]); ``null`` keeps the training z-score.
    :param images: how many test images (the first ones of the test split).
    :param batch_size: images per pipeline call (all conditions use the same batches).
    :param seed: seed of the shifts and random pairings (per image: independent of ``images``).
    :param video: write the moving-object video (first test image).
    :param video_path: ``circle`` or ``line``.
    :param video_frames: frames (one intervention each).
    :param video_extent: the path's radius / half-length, in px at 512 px (scaled to the image).
    :param fps: video frame rate.
    :param grid_images: images shown in each PNG grid.
    :param out: output folder (default ``outputs/interventions/<task>-<time>``).
    :param prompts_dir: local folder with the reference prompt CSVs (sets ``prompts.local_dir``).
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param wandb_project: log to a new W&B run in this project (offline without credentials);
        without it, results are logged only into an already active run.
    :param progress: progress bars.
    :return: the output folder.
    """
    from probes.export.resolve import resolve_probes

    conditions = list(conditions or CONDITIONS)
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown conditions {bad}; choose from {list(CONDITIONS)}")
    if random_target not in RANDOM_KINDS:
        raise ValueError(f"random_target must be one of {list(RANDOM_KINDS)}, got {random_target!r}")
    if video_path not in PATH_KINDS:
        raise ValueError(f"video_path must be one of {list(PATH_KINDS)}, got {video_path!r}")
    if images < 1 or batch_size < 1:
        raise ValueError(f"images and batch_size must be >= 1, got {images}, {batch_size}")
    probeset = load_probes(resolve_probes(probes))
    if binary_loss == "auto":
        binary_loss = "squared" if optimizer == "projection" else probeset.binary_fit_loss
    settings = EditSettings(iterations=iterations, lr=lr, huber_delta=huber_delta, binary_loss=binary_loss,
                            optimizer=optimizer)
    defaults = TASK_DEFAULTS.get(task, TASK_DEFAULTS["depth"])
    plan = plan_edits(probeset, task, layers or defaults["layers"], steps if steps is not None else defaults["steps"])
    session = InterventionSession(probeset, task, device, prompts_dir)
    out_dir = Path(out) if out else Path("outputs/interventions") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"probes": str(probes), "task": task, "layers": list(dict.fromkeys(p.info.layer for p in plan)),
              "steps": sorted({p.info.step for p in plan}),
              "iterations": iterations, "lr": lr, "huber_delta": huber_delta, "binary_loss": binary_loss,
              "optimizer": optimizer,
              "probe_fit": str(probeset.meta.get("hparams", {}).get("_class_path", "")).rsplit(".", 1)[-1],
              "conditions": conditions,
              "random_target": random_target, "images": images, "seed": seed, "image_size": list(session.size),
              "model": dict(probeset.spec.model).get("model_id"), "edits_per_image": len(plan)}
    if plan[0].info.kind == "regression":
        record["value_range"] = value_range
    run, own_run = _start_wandb(wandb_project, out_dir, record)
    try:
        results, per_image = run_conditions(session, plan, settings, conditions, random_target, value_range,
                                            images, batch_size, seed, progress)
        summary = scoring.aggregate(per_image)
        write_rows(summary, SUMMARY_COLUMNS, out_dir / "metrics.csv")
        write_rows(per_image, PER_IMAGE_COLUMNS, out_dir / "per_image.csv")
        kind = plan[0].info.kind
        shown = [r for r in results if r.conditions][:grid_images]
        grids = {c: write_grid(shown, c, kind, out_dir / f"grid_{c}.png") for c in conditions} if shown else {}
        paths = None
        if video:
            paths = moving_video(session, plan, settings, results[0], value_range, video_path, video_frames,
                                 video_extent, fps, out_dir / f"video_{task}", progress)
        notes = [] if not probeset.spec.is_random else [
            "", "NOTE: this model has RANDOM WEIGHTS: these numbers only show that the intervention runs."]
        write_markdown(out_dir / "report.md", summary, kind, record, grids, paths, notes)
        if run is not None:
            _log_wandb(run, summary, per_image, grids, paths)
    finally:
        if own_run and run is not None:
            run.finish()
    print(f"Intervention: {out_dir / 'report.md'}")
    return out_dir


def run_conditions(session: InterventionSession, plan: Sequence[LinearProbe], settings: EditSettings,
                   conditions: Sequence[str], random_target: str, value_range: tuple[float, float] | None,
                   images: int, batch_size: int, seed: int, progress: bool = True) -> tuple[list[ImageResult], list[dict]]:
    """Steps 2-4 of the module docstring: per-image results and long per-image score rows."""
    records = session.records[:images]
    maker = TargetMaker.for_probe(plan[0].info, value_range)
    chunks = [records[k:k + batch_size] for k in range(0, len(records), batch_size)]
    bar = _EditBar(len(plan) * len(chunks) * len(conditions), progress)   # one edit per batch
    # 2. originals, labelled
    results: list[ImageResult] = []
    raw_labels: list[np.ndarray] = []
    for chunk in chunks:
        bar.describe(f"originals {len(results)}/{len(records)}")
        originals = session.generate(chunk)
        labels = session.label(originals, chunk)
        for r, img, lab in zip(chunk, originals, labels):
            results.append(ImageResult(index=r.index, prompt=r.prompt, seed=r.seed, shift=(0, 0), original=img,
                                       label=maker.probe_units(lab)))
            raw_labels.append(lab)
    # 3. targets: shifts and random pairings drawn per image, from (seed, test index)
    targets: dict[str, list[np.ndarray]] = {c: [] for c in (*conditions, "requested")}
    for k, res in enumerate(results):
        res.shift = sample_shift(np.random.default_rng([seed, res.index, 0]), session.size)
        targets["requested"].append(maker.edit(raw_labels[k], res.shift))
        if "edit" in conditions:
            targets["edit"].append(targets["requested"][k])
        if "noop" in conditions:
            targets["noop"].append(maker.noop(raw_labels[k]))
        if "random" in conditions:
            src, shift = random_source(random_target, k, raw_labels, np.random.default_rng([seed, res.index, 1]),
                                       session.size)
            targets["random"].append(maker.edit(src, shift))
    # 4. each condition, scored against its own target, the requested one and the original
    per_image: list[dict] = []
    start = 0
    for chunk in chunks:
        rows = range(start, start + len(chunk))
        for condition in conditions:
            bar.describe(f"{condition} {start + 1}-{start + len(chunk)}/{len(records)}")
            batch_targets = np.stack([targets[condition][k] for k in rows])
            edited, edits = session.edit(chunk, plan, batch_targets, settings, bar)
            relabels = session.label(edited, chunk)
            for j, k in enumerate(rows):
                res = results[k]
                relabel = maker.probe_units(relabels[j])
                scores = (scoring.score_foreground(res.label > 0.5, relabel > 0.5, targets[condition][k],
                                                   targets["requested"][k], res.shift)
                          if maker.kind == "binary" else
                          scoring.score_regression(res.label, relabel, targets[condition][k], targets["requested"][k]))
                scores.update(scoring.pixel_difference(edited[j], res.original))
                scores.update(_loss_scores(edits, j))
                res.conditions[condition] = ConditionResult(targets[condition][k], edited[j], relabel, scores)
                per_image += [{"split": "test", "index": res.index, "seed": res.seed, "prompt": res.prompt,
                               "condition": condition, "metric": m, "value": v} for m, v in scores.items()]
        start += len(chunk)
    bar.close()
    return results, per_image


def moving_video(session: InterventionSession, plan: Sequence[LinearProbe], settings: EditSettings,
                 image: ImageResult, value_range: tuple[float, float] | None, path: str, frames: int,
                 extent: float, fps: float, stem: Path, progress: bool = True) -> dict[str, Path]:
    """The moving-object video of one image: its label moved along the path, one intervention per frame."""
    maker = TargetMaker.for_probe(plan[0].info, value_range)
    record = next(r for r in session.records if r.index == image.index)
    raw = session.label(image.original[None], [record])[0]
    targets = [maker.edit(raw, off) for off in offset_path(path, frames, extent, session.size)]
    frames_ = render_frames(lambda t: session.edit([record], plan, t[None], settings)[0][0], targets, progress)
    scale = max(1, math.ceil(256 / min(session.size)))
    return write_video(frames_, stem, fps, scale)


def intervene_main(argv: Sequence[str] | None = None) -> None:
    """``diffusion-probes intervene``: :func:`intervene` from the command line or a YAML config."""
    from jsonargparse import auto_cli

    auto_cli(intervene, args=list(argv) if argv is not None else None, as_positional=False)
