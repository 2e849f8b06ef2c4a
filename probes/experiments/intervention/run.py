"""``diffusion-probes intervene``: the causal test over a test split, with controls, report and video.

1. Load the export (a folder or a W&B artifact) and rebuild the recorded model, test prompts and
   labeler (:class:`~probes.experiments.intervention.session.InterventionSession`).
2. Generate and label the first ``images`` test images unedited (the originals).
3. Per image, draw the requested shift and build the targets of each condition (``edit``,
   ``noop``, ``random``; :mod:`~probes.experiments.intervention.targets`).
4. Regenerate each image once per condition and edit mode (``activation``: the editor optimises
   the activations, with ``erase``: only in directions that move no erased concept; ``latent``: the
   latent is guided by the probes' loss), re-label the result, score it
   (:mod:`~probes.experiments.intervention.score`) and measure its side effects
   (:mod:`~probes.experiments.intervention.side_effects`: PSNR, the object's colour shift, whether the
   toy classifier still names the same shapes, the probe loss before and after).
5. Write ``metrics.csv`` (per-condition means, long form), ``per_image.csv`` (every image's
   scores, long form), ``report.md`` and a self-contained ``report.html`` with one PNG grid per
   condition, and, with ``video: true``, the moving-object video (MP4 + GIF: about two thirds of a
   run's time, so off by default); log them to W&B when asked (``wandb_project``) or when a run is
   already active. The console gets the verdict in one line (moved x % vs y % random, no-op MAE z).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.common.csv_rows import write_csv
from probes.common.progress import progress_bar
from probes.experiments.intervention import score as scoring
from probes.experiments.intervention import side_effects
from probes.experiments.intervention.config import InterventionConfig
from probes.experiments.intervention.editor import EditRecord, EditSettings, plan_edits
from probes.experiments.intervention.erasure import (
    ConceptEraser,
    fit_store_erasers,
    select_concepts,
    store_toy_concepts,
)
from probes.experiments.intervention.guidance import GuidanceSettings
from probes.experiments.intervention.report import (
    ConditionResult,
    ImageResult,
    mode_verdicts,
    write_grid,
    write_html,
    write_markdown,
)
from probes.experiments.intervention.session import InterventionSession
from probes.experiments.intervention.targets import TargetMaker, offset_path, random_source, sample_shift
from probes.experiments.intervention.video import active_wandb_run, log_video, render_frames, write_video
from probes.export.probeset import LinearProbe, ProbeSet, load_probes
from probes.reporting.wandb_logger import start_wandb_run

PER_IMAGE_COLUMNS = ["split", "index", "seed", "prompt", "condition", "metric", "value"]
SUMMARY_COLUMNS = ["split", "condition", "metric", "value"]


def _loss_scores(records: Sequence[EditRecord], k: int) -> dict[str, float]:
    """Image ``k``'s probe loss before and after optimisation, averaged over the edits, and how far the
    edits moved its tokens out of their distribution (where measured)."""
    if not records:
        return {}
    out = {"probe_loss_before": float(np.mean([r.loss_before[k] for r in records])),
           "probe_loss_after": float(np.mean([r.loss_after[k] for r in records]))}
    shifts = [r.shift[k] for r in records if r.shift]
    if shifts:
        out["activation_shift"] = float(np.mean(shifts))
    return out


@dataclass
class EditMode:
    """One way of editing: its name, the probes it uses and the call that regenerates a batch edited
    towards its targets (``apply(records, targets [B, H, W], on_edit) -> (images, edit records)``)."""

    name: str
    plan: Sequence[LinearProbe]
    apply: Callable[..., tuple[np.ndarray, list[EditRecord]]]
    edits_per_batch: int


def condition_label(mode: str, condition: str, modes: Sequence[str]) -> str:
    """A condition's name in the outputs: as today with one mode, ``mode/condition`` with both."""
    return condition if len(modes) == 1 else f"{mode}/{condition}"


def side_effect_scores(original: np.ndarray, edited: np.ndarray, mask: np.ndarray | None,
                       relabel_mask: np.ndarray | None) -> dict[str, float]:
    """PSNR of the edited image against the original and, for a task with an object mask, the
    object's colour shift (CIELAB ΔE of its mean colour, original vs edited, each under its own mask)."""
    out = {"pixel_psnr": side_effects.psnr(edited, original)}
    if mask is not None and relabel_mask is not None:
        out["colour_shift"] = side_effects.object_colour_shift(original, mask, edited, relabel_mask)
    return out


class _EditBar:
    """One progress bar over every edit of the run (an SD generation takes minutes of edits)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = progress_bar(total, "intervening", "edit", enabled)

    def __call__(self, record: EditRecord) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"step {record.step} {record.layer} loss {np.mean(record.loss_after):.3g}",
                                 refresh=False)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)

    def close(self) -> None:
        self.bar.close()


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


def intervene(config: InterventionConfig) -> Path:
    """Run the intervention ``config`` describes (see :class:`InterventionConfig` and the module
    docstring); returns the output folder."""
    from probes.export.resolve import resolve_probes

    c = config
    probeset = load_probes(resolve_probes(c.probes))
    binary_loss = c.binary_loss
    if binary_loss == "auto":
        binary_loss = "squared" if c.optimizer == "projection" else probeset.binary_fit_loss
    settings = EditSettings(iterations=c.iterations, lr=c.lr, huber_delta=c.huber_delta, binary_loss=binary_loss,
                            optimizer=c.optimizer)
    plan = plan_edits(probeset, c.task, c.edit_layers(), c.edit_steps())
    latent_plan = plan_edits(probeset, c.task, c.edit_layers(), c.latent_steps()) if "latent" in c.modes() else []
    guide = GuidanceSettings(weight=c.guidance_weight, iterations=c.guidance_iterations, huber_delta=c.huber_delta,
                             binary_loss=probeset.binary_fit_loss if c.binary_loss == "auto" else binary_loss)
    erasers = fit_erasers(probeset, plan, c.erase, c.erase_samples, c.progress) if c.erase else {}
    measure, shift_note = None, "not measured (activation_shift: false)"
    if c.activation_shift and "activation" in c.modes():
        measure, shift_note = fit_shift_measure(probeset, plan, c.shift_samples, c.progress)
    session = InterventionSession(probeset, c.task, c.device, c.prompts_dir, allow_other_model=c.allow_other_model,
                                  split=c.split)
    if "latent" in c.modes() and getattr(session.pipe, "unet", None) is None:
        raise ValueError(f"mode: {c.mode} guides a U-Net's latent through its scheduler, and "
                         f"{type(session.pipe).__name__} has no U-Net; use mode: activation")
    modes = []
    if "activation" in c.modes():
        modes.append(EditMode("activation", plan,
                              lambda r, t, bar: session.edit(r, plan, t, settings, bar, erasers, measure), len(plan)))
    if "latent" in c.modes():
        modes.append(EditMode("latent", latent_plan, lambda r, t, bar: session.guide(r, latent_plan, t, guide, bar),
                              len({p.info.step for p in latent_plan})))
    out_dir = Path(c.out) if c.out else Path("outputs/interventions") / f"{c.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"probes": str(c.probes), "task": c.task, "layers": list(dict.fromkeys(p.info.layer for p in plan)),
              "steps": sorted({p.info.step for p in plan}),
              "iterations": c.iterations, "lr": c.lr, "huber_delta": c.huber_delta, "binary_loss": binary_loss,
              "optimizer": c.optimizer,
              "probe_fit": str(probeset.meta.get("module_class") or probeset.meta.get("hparams", {}).get("_class_path", "")).rsplit(".", 1)[-1],
              "conditions": c.conditions,
              "random_target": c.random_target, "images": c.images, "split": c.split, "seed": c.seed, "image_size": list(session.size),
              "model": dict(probeset.spec.model).get("model_id"), "edits_per_image": len(plan)}
    if c.mode != "activation":
        record.update(mode=c.mode, guidance_weight=c.guidance_weight,
                      guidance_steps=sorted({p.info.step for p in latent_plan}),
                      guidance_iterations=c.guidance_iterations)
    if c.erase:
        record.update(erase=list(c.erase), erase_samples=c.erase_samples,
                      erased_directions={f"{s}/{layer}": e.rank for (s, layer), e in sorted(erasers.items())})
    record["same_class"] = "toy classifier" if session.has_classifier else "n/a (no classifier for these images)"
    if "activation" in c.modes():
        record["activation_shift"] = shift_note
    if plan[0].info.kind == "regression":
        record["value_range"] = c.value_range
    own_run = c.wandb_project is not None
    run = (start_wandb_run(c.wandb_project, out_dir, job_type="intervention", config=record) if own_run
           else active_wandb_run())
    try:
        results, per_image = run_conditions(session, modes, c.conditions, c.random_target, c.value_range,
                                            c.images, c.batch_size, c.seed, c.progress)
        summary = scoring.aggregate(per_image)
        write_csv(summary, SUMMARY_COLUMNS, out_dir / "metrics.csv")
        write_csv(per_image, PER_IMAGE_COLUMNS, out_dir / "per_image.csv")
        kind = plan[0].info.kind
        shown = [r for r in results if r.conditions][:c.grid_images]
        labels = [condition_label(m.name, cond, c.modes()) for m in modes for cond in c.conditions]
        grids = ({cond: write_grid(shown, cond, kind, out_dir / f"grid_{cond.replace('/', '_')}.png") for cond in labels}
                 if shown else {})
        paths = None
        if c.video:       # one video per mode; the report shows the first mode's
            for m in modes:
                stem = out_dir / (f"video_{c.task}" if len(modes) == 1 else f"video_{c.task}_{m.name}")
                made = moving_video(session, m, results[0], c.value_range, c.video_path, c.video_frames,
                                    c.video_extent, c.fps, stem, c.progress)
                paths = paths or made
        notes = [] if not probeset.spec.is_random else [
            "", "NOTE: this model has RANDOM WEIGHTS: these numbers only show that the intervention runs."]
        write_markdown(out_dir / "report.md", summary, kind, record, grids, paths, notes)
        write_html(out_dir / "report.html", summary, kind, record, grids, paths, notes)
        if run is not None:
            _log_wandb(run, summary, per_image, grids, paths)
    finally:
        if own_run and run is not None:
            run.finish()
    for line in mode_verdicts(summary, plan[0].info.kind):
        print(line)
    print(f"Report: {out_dir / 'report.html'}")
    return out_dir


def run_conditions(session: InterventionSession, modes: Sequence[EditMode], conditions: Sequence[str],
                   random_target: str, value_range: tuple[float, float] | None, images: int, batch_size: int,
                   seed: int, progress: bool = True) -> tuple[list[ImageResult], list[dict]]:
    """Steps 2-4 of the module docstring: per-image results and long per-image score rows."""
    records = session.records[:images]
    maker = TargetMaker.for_probe(modes[0].plan[0].info, value_range)
    chunks = [records[k:k + batch_size] for k in range(0, len(records), batch_size)]
    names = [m.name for m in modes]
    bar = _EditBar(sum(m.edits_per_batch for m in modes) * len(chunks) * len(conditions), progress)
    # 2. originals, labelled (and classified, where a classifier exists)
    results: list[ImageResult] = []
    raw_labels: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    for chunk in chunks:
        bar.describe(f"originals {len(results)}/{len(records)}")
        originals = session.generate(chunk)
        labels = session.label(originals, chunk)
        if session.has_classifier:
            classes += list(session.classify(originals))
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
    # 4. each mode and condition, scored against its own target, the requested one and the original
    per_image: list[dict] = []
    for mode in modes:
        start = 0
        for chunk in chunks:
            rows = range(start, start + len(chunk))
            for condition in conditions:
                label = condition_label(mode.name, condition, names)
                bar.describe(f"{label} {start + 1}-{start + len(chunk)}/{len(records)}")
                batch_targets = np.stack([targets[condition][k] for k in rows])
                edited, edits = mode.apply(chunk, batch_targets, bar)
                relabels = session.label(edited, chunk)
                kept = (side_effects.same_class(np.stack([classes[k] for k in rows]), session.classify(edited))
                        if session.has_classifier else None)
                for j, k in enumerate(rows):
                    res = results[k]
                    relabel = maker.probe_units(relabels[j])
                    binary = maker.kind == "binary"
                    scores = (scoring.score_foreground(res.label > 0.5, relabel > 0.5, targets[condition][k],
                                                       targets["requested"][k], res.shift)
                              if binary else
                              scoring.score_regression(res.label, relabel, targets[condition][k],
                                                       targets["requested"][k]))
                    scores.update(scoring.pixel_difference(edited[j], res.original))
                    scores.update(_loss_scores(edits, j))
                    scores.update(side_effect_scores(res.original, edited[j], res.label > 0.5 if binary else None,
                                                     relabel > 0.5 if binary else None))
                    if kept is not None:
                        scores["same_class"] = float(kept[j])
                    res.conditions[label] = ConditionResult(targets[condition][k], edited[j], relabel, scores)
                    per_image += [{"split": getattr(session, "split", "test"), "index": res.index, "seed": res.seed, "prompt": res.prompt,
                                   "condition": label, "metric": m, "value": v} for m, v in scores.items()]
            start += len(chunk)
    bar.close()
    return results, per_image


def probe_store(probeset: ProbeSet) -> Any | None:
    """The activation store the probes were trained on, where the export's record of it still exists."""
    from probes.store.activations import ActivationStore

    root = Path(str(probeset.spec.store_dir or ""))
    if not probeset.spec.store_dir or not (root / "manifest.json").exists():
        return None
    return ActivationStore(root)


def train_samples(store: Any, samples: int) -> list[int]:
    """The first ``samples`` committed training samples of ``store`` (never the test split the
    intervention is scored on)."""
    committed = store.committed()
    return [i for i, p in enumerate(store.manifest.get("prompts") or [])
            if p.get("split") == "train" and i < len(committed) and committed[i]][:samples]


def fit_erasers(probeset: ProbeSet, plan: Sequence[LinearProbe], erase: Sequence[str], samples: int,
                progress: bool = True) -> Mapping[tuple[int, str], ConceptEraser]:
    """LEACE erasers for the concepts ``erase`` names at every planned (step, layer), fitted on the first
    ``samples`` training samples of the store the probes were trained on. The concepts are the toy
    world's (:func:`store_toy_concepts`)."""
    from probes.labels.toy_nets import predict as toy_predict

    store = probe_store(probeset)
    if store is None:
        raise FileNotFoundError(f"erase: {list(erase)} fits LEACE on the probes' store, but the export at "
                                f"{probeset.path} records store {probeset.spec.store_dir!r}, which is not there; "
                                f"run from where the store lives, or set erase: []")
    label_cfg = dict(dict(probeset.spec.data_config).get("labels", {}).get("foreground", {}))
    weights_dir = label_cfg.get("weights_dir") if str(label_cfg.get("name", "")).startswith("toy") else None
    sources = select_concepts(erase, store_toy_concepts(store, lambda im: toy_predict("foreground", im, weights_dir)))
    train = train_samples(store, samples)
    if not train:
        raise ValueError(f"the store at {store.root} has no committed training samples to fit erase: {list(erase)} on")
    wrap = (lambda xs: progress_bar(len(xs), "fitting erasers", "sample", True, iterable=xs)) if progress else iter
    return fit_store_erasers(store, sources, [(p.info.step, p.info.layer) for p in plan], train, progress=wrap)


def fit_shift_measure(probeset: ProbeSet, plan: Sequence[LinearProbe], samples: int, progress: bool = True
                      ) -> tuple[Callable | None, str]:
    """The editor's distribution-shift measure (:func:`side_effects.shift_measure`), its Gaussians fitted
    on the probes' store, and a note for the record; without the store, no measure and a note that says why."""
    store = probe_store(probeset)
    if store is None:
        return None, (f"not measured: the probes' store {probeset.spec.store_dir!r} is not there "
                      f"(it holds the token statistics)")
    train = train_samples(store, samples)
    if not train:
        return None, f"not measured: the store at {store.root} has no committed training samples"
    if progress:
        print(f"[intervene] fitting token Gaussians on {len(train)} training samples for the activation shift",
              flush=True)
    half = "cond" if "cond" in store.manifest["capture"]["halves"] else store.manifest["capture"]["halves"][-1]
    gaussians = side_effects.fit_token_gaussians(store, [(p.info.step, p.info.layer) for p in plan], train, half)
    return side_effects.shift_measure(gaussians), (f"Mahalanobis distance of edited over unedited tokens, under the "
                                                    f"token mean and covariance of {len(train)} training samples")


def moving_video(session: InterventionSession, mode: EditMode, image: ImageResult,
                 value_range: tuple[float, float] | None, path: str, frames: int,
                 extent: float, fps: float, stem: Path, progress: bool = True) -> dict[str, Path]:
    """The moving-object video of one image: its label moved along the path, one intervention per frame."""
    maker = TargetMaker.for_probe(mode.plan[0].info, value_range)
    record = next(r for r in session.records if r.index == image.index)
    raw = session.label(image.original[None], [record])[0]
    targets = [maker.edit(raw, off) for off in offset_path(path, frames, extent, session.size)]
    frames_ = render_frames(lambda t: mode.apply([record], t[None], None)[0][0], targets, progress)
    scale = max(1, math.ceil(256 / min(session.size)))
    return write_video(frames_, stem, fps, scale)
