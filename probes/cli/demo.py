"""``make demo``: the protocol on the toy world's trained model and on its controls, side by side.

Every run is an ordinary ``train.py fit`` run: the model (``configs/toy/demo.yaml``), the protocol's
permuted-weights control on its own images (``control_permuted_own_images``), and the two
same-image controls, a permuted and a freshly initialised U-Net replayed on the model's own
trajectory and probed against the model's labels (``control_permuted_same_images``,
``control_random_same_images``). This chains them and puts the answer to "does the model know
more than where things usually are?" in one place (``comparison.md`` and ``report/``): first
sample quality (do the samples show what their captions say: shape, colour, left/right, with
intervals and chance), then per task:
the best probe, the prior map and the plane, the gain over position, every run against its own
baselines and the model against each control (paired bootstrap intervals over test images),
aligned depth metrics, and emergence relative to the prior map; last, the replication's classifier
experiment, which the model's run (and the own-images control's) scores on the decoded images of its
one-object test scenes. ``configs/toy/experiment.yaml`` is the same on 500 test and 200 validation scenes.
"""
from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probes.common.files import atomic_write_text
from probes.paths import REPO_ROOT
from probes.reporting.markup import fmt_cell

#: every run of the comparison: the model, then its controls (``configs/toy/experiment.yaml`` runs them all)
ALL_RUNS = (("model", "model", "configs/toy/demo.yaml"),
            ("control_permuted_own_images", "control_permuted_own_images",
             "configs/toy/control_permuted_own_images.yaml"),
            ("control_permuted_same_images", "control_permuted_same_images",
             "configs/toy/control_permuted_same_images.yaml"),
            ("control_random_same_images", "control_random_same_images", "configs/toy/control_random_same_images.yaml"))
#: ``make demo``'s runs: the model and one control of each kind (its own images; the model's images). The
#: freshly initialised same-image control is the experiment's: in the demo it repeats what the permuted
#: one shows at the cost of another minute of U-Net replays (the demo's time bar is 5 min)
RUNS = ALL_RUNS[:3]
#: what each run is, in a sentence (comparison.md's legend)
LEGEND = {
    "model": "the trained toy model: its images, its labels, its activations",
    "control_permuted_own_images": "the protocol's control: U-Net weights permuted, generating (and so labelling) "
                                   "its own images",
    "control_permuted_same_images": "the permuted U-Net run on the model's own trajectory (same x_t, timesteps and "
                                    "text embeddings), probed against the model's labels",
    "control_random_same_images": "a freshly initialised U-Net run on the model's own trajectory, probed against "
                                  "the model's labels",
}


def load_average() -> str:
    """The machine's 1/5/15-minute load, for the timings' context (shared machines)."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def demo(out: str = "outputs/demo", overrides: Sequence[str] = (), runs: Sequence[tuple[str, str, str]] = RUNS,
         classifier_run: tuple[str, str, str] | None = None, jobs: int | None = None) -> Path:
    """Run every config of ``runs`` into ``out/<folder>``, then compare them in ``out/comparison.md``.

    :param out: output folder (one run folder per config, ``comparison.md``, ``summary.json``, ``report/``).
    :param overrides: extra command-line options for every run (e.g. ``--data.prompts.limit 8``).
    :param runs: ``(label, folder, config)`` triples; the first is the model, the others its controls.
    :param classifier_run: an extra run's ``(label, folder, config)`` whose classifier scores join
        ``comparison.md`` (e.g. ``configs/toy/classifier.yaml``, one-object scenes only). None: only the
        runs' own (the model's config scores the classifier on its one-object test scenes).
    :param jobs: runs at a time, as processes side by side (:mod:`probes.cli.side_by_side`; a same-image
        control starts when the model's run is done). None: one per core the thread policy finds free;
        1: one after another in this process.
    """
    from probes.cli.train import WANDB_DIR_ENV, WANDB_GROUP_ENV

    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a whole number >= 1 (runs at a time; 1: one after another), not {jobs!r}")

    out_dir = Path(out)
    # one W&B group and one wandb/ folder for the whole demo (`wandb sync <out>/wandb/offline-run-*`)
    saved = {k: os.environ.get(k) for k in (WANDB_GROUP_ENV, WANDB_DIR_ENV)}
    os.environ[WANDB_GROUP_ENV] = f"demo-{out_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ[WANDB_DIR_ENV] = str(out_dir)
    try:
        return _chain(out_dir, overrides, runs, classifier_run, jobs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _chain(out_dir: Path, overrides: Sequence[str], runs: Sequence[tuple[str, str, str]],
           classifier_run: tuple[str, str, str] | None, jobs: int | None) -> Path:
    """The demo's fits, then its comparison (see :func:`demo`)."""
    from probes.cli.evaluate import comparison_report

    loads = {"start": load_average()}
    fits = [*runs, *([classifier_run] if classifier_run else [])]
    seconds = run_fits(out_dir, fits, overrides, jobs)
    classifier_lines = classifier_section(out_dir, fits)
    loads["end"] = load_average()
    t0 = time.perf_counter()
    lines, summary, section = comparison(out_dir, runs)
    lines += classifier_lines
    lines += [f"Wall time (s): {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}; comparison "
              f"{time.perf_counter() - t0:.0f}. Load average (1/5/15 min) at start {loads['start']}, at the end "
              f"{loads['end']} (a shared machine: timings move with it).", ""]
    atomic_write_text(out_dir / "comparison.md", "\n".join(lines))
    atomic_write_text(out_dir / "summary.json", json.dumps({**summary, "seconds": seconds, "load": loads}, indent=1,
                                                           default=str))
    comparison_report([str(out_dir / folder) for _, folder, _ in runs], [label for label, _, _ in runs],
                      str(out_dir / "report"), sections=[section])
    print("\n".join(verdict_lines(summary)), flush=True)      # the verdicts; the tables are in comparison.md
    print(f"Demo outputs: {out_dir.resolve()} (comparison.md, report/report.html, one run folder per model)")
    return out_dir


def replays_model(config: str, overrides: Sequence[str] = ()) -> bool:
    """Whether a run replays the model's recorded trajectory (a same-image control): it reads the
    model's store, so it can start only when the model's run is done."""
    import yaml

    from probes.cli.compose import config_bases

    if any(str(o).startswith("--data.replay") for o in overrides):
        return True
    return any(((yaml.safe_load(p.read_text()) or {}).get("data") or {}).get("replay")
               for p in config_bases(REPO_ROOT / config))


def run_fits(out_dir: Path, fits: Sequence[tuple[str, str, str]], overrides: Sequence[str],
             jobs: int | None) -> dict[str, float]:
    """Every ``(label, folder, config)`` fit into ``out_dir/<folder>``: one after another in this process
    (``jobs`` 1, or one free core), else side by side as processes (:mod:`probes.cli.side_by_side`),
    logs in ``out_dir/logs``. Returns each run's wall seconds (side by side, also ``all runs``: the
    wall time of them all, less than their sum)."""
    from probes.cli.side_by_side import Job, run_side_by_side
    from probes.common.threads import busy_cpus_now, choose_threads

    cores = choose_threads(busy_now=busy_cpus_now).threads
    slots = min(len(fits), cores if jobs is None else jobs)
    argv = {folder: ["fit", "--config", str(REPO_ROOT / config), "--run_dir", str(out_dir / folder), *overrides]
            for _, folder, config in fits}
    seconds: dict[str, float] = {}
    if slots <= 1:
        from probes.cli.train import train_main

        for _, folder, _ in fits:
            t0 = time.perf_counter()
            train_main(argv[folder])
            seconds[folder] = time.perf_counter() - t0
        return seconds
    model = fits[0][1]
    plan = [Job(folder, tuple(argv[folder]), (model,) if k and replays_model(config, overrides) else ())
            for k, (_, folder, config) in enumerate(fits)]
    t0 = time.perf_counter()
    seconds = run_side_by_side(plan, slots=slots, cores=max(cores, slots), log_dir=out_dir / "logs")
    seconds["all runs"] = time.perf_counter() - t0
    return seconds


def classifier_section(out_dir: Path, runs: Sequence[tuple[str, str, str]]) -> list[str]:
    """The classifier on decoded images, per step (the replication's experiment), for every run that
    scored it (a same-image control's images are the model's, so its configs leave it out)."""
    from probes.reporting.tables import read_metrics_csv
    from probes.store.activations import read_manifest

    table, layers, steps = [], set(), []
    for label, folder, _ in runs:
        path = out_dir / folder / "metrics.csv"
        clf = [r for r in read_metrics_csv(path) if r["task"] == "classification"] if path.exists() else []
        if not clf:
            continue
        prompts = read_manifest((out_dir / folder / "store").resolve() / "manifest.json").get("prompts", [])
        classes = [p["label"] for p in prompts if p.get("split") == "test" and p.get("label") is not None]
        n = len(classes)
        common = max(classes.count(c) for c in set(classes)) / n if n else float("nan")
        per_step = {(r["metric"], r["step"]): r["value"] for r in clf}
        steps = sorted({r["step"] for r in clf})
        layers |= {r["layer"] for r in clf}
        table += [f"| {label} ({n} images; most common shape {common:.2f}) | {m} | "
                  + " | ".join(fmt_cell(per_step.get((m, s))) for s in steps) + " |" for m in ("top1", "prob")]
    if not table:
        return []
    return ["## The classifier on decoded images", "",
            f"The toy shape classifier on the image decoded after each step ({', '.join(sorted(layers))}) of the "
            "one-object test scenes, against the caption's shape: top-1 accuracy and the probability it gives that "
            "shape. Chance top-1 is 0.25 for a uniform guess of the four shapes, and the most common shape's share of "
            "the scenes for a classifier that always names it (what a control that draws noise tends to do). The "
            "probes' emergence on the same images: each run's `report.html`.", "",
            "| run | measure | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps),
            *table, ""]


def own_images(folder: Path) -> bool:
    """Whether a run generated its own images (a same-image control reads the model's)."""
    from probes.store.activations import read_manifest

    return not read_manifest((folder / "store").resolve() / "manifest.json").get("images_from")


def sample_quality_section(out_dir: Path, runs: Sequence[tuple[str, str, str]]
                           ) -> tuple[list[str], dict[str, Any], tuple[str, str, str]]:
    """Do the samples show what their captions say? Every run that generates its own images (the
    same-image controls use the model's): shape, colour and left/right with intervals and chance
    (:mod:`probes.experiments.toy.sample_quality`), as ``comparison.md`` lines, a summary record and
    the report's first section."""
    from probes.experiments.toy.sample_quality import BARS_NOTE, quality_table, store_sample_quality
    from probes.store.activations import ActivationStore

    qualities = {label: store_sample_quality(ActivationStore((out_dir / folder / "store").resolve()))
                 for label, folder, _ in runs if own_images(out_dir / folder)}
    if not qualities:
        return [], {}, ("Do the samples show what their captions say?", "no run generated its own images", "")
    n = int(next(iter(qualities.values()))["images"])
    intro = (f"Images per run: {n} (each run's own; the same-image controls use the model's). Measured with the "
             "toy world's own models (trained on renders): in one-object scenes, is the shape classifier's top shape "
             "the caption's, and is the colour most object pixels show the caption's; in two-object scenes of two "
             "colours, is the first-named colour left of the second as drawn? A control with random or permuted "
             "weights draws noise, so its rates say what these measures give for images that show nothing.")
    md, h = quality_table(qualities)
    grids_md, grids_html = sample_grids(out_dir, runs)
    lines = ["## Do the samples show what their captions say?", "", intro, "", md, "", BARS_NOTE, "", *grids_md]
    section = ("Do the samples show what their captions say?", "\n\n".join([intro, md, BARS_NOTE, *grids_md]),
               f"<p>{html.escape(intro)}</p>{h}<p>{html.escape(BARS_NOTE)}</p>{''.join(grids_html)}")
    return lines, qualities, section


def sample_grids(out_dir: Path, runs: Sequence[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """The first test samples of every run that draws its own images (``samples_<folder>.png`` in
    ``out_dir``), as Markdown lines and HTML figures, each captioned with what the images are."""
    from probes.reporting.markup import embed_png
    from probes.reporting.samples import store_sample_grid
    from probes.store.activations import ActivationStore

    md, hs = [], []
    for label, folder, _ in runs:
        if not own_images(out_dir / folder):
            continue
        store = ActivationStore((out_dir / folder / "store").resolve())
        path = store_sample_grid(store, out_dir / f"samples_{folder}.png", f"{label}: first test samples")
        if label == runs[0][0]:
            words = f"{label}: its first test samples under their captions (what its probes and labels saw)."
        else:
            words = (f"{label}: its first test samples. Its weights are not a trained model's, so these are noise; "
                     "its labels are the labelers' output on noise, and its scores say what the measures give for "
                     "images that show nothing (the floor the model is compared with).")
        md += [f"![{label} samples]({path.name})", "", f"*{words}*", ""]
        hs.append(embed_png(path, words))
    return md, hs


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """What the console shows at the end: one line per measure (the tables are in comparison.md)."""
    from probes.experiments.toy.sample_quality import BARS, COLUMNS, rate_cell

    out = []
    for label, q in summary.get("sample_quality", {}).items():
        out.append(f"[demo] {label} samples: " + "; ".join(f"{COLUMNS[k]} {rate_cell(q, k)}" for k in BARS))
    for task, by_run in summary.get("tasks", {}).items():
        model = next(iter(by_run))
        out.append(f"[demo] {task}: {by_run[model]['verdict']}")
    return out


def comparison(out_dir: Path, runs: Sequence[tuple[str, str, str]]
               ) -> tuple[list[str], dict[str, Any], tuple[str, str, str]]:
    """``comparison.md``'s body and ``summary.json``'s content (module docstring)."""
    from probes.metrics.baseline_rows import PRIOR
    from probes.reporting.beyond_position import (
        INTRO,
        aligned_table,
        compare,
        emergence_table,
        load_run,
        summary_record,
        summary_table,
        task_summary,
    )
    from probes.reporting.markup import MISSING
    from probes.tasks import get_task

    loaded = {label: load_run(out_dir / folder) for label, folder, _ in runs}
    labels = [label for label, _, _ in runs]
    model = labels[0]
    n = loaded[model][1].index.size if loaded[model][1] is not None else None
    lines = [f"# Demo: {model} vs {', '.join(labels[1:])}", "",
             *[f"- **{label}**: {LEGEND.get(label, folder)} (`{config}`)" for label, folder, config in runs], ""]
    quality, q_record, section = sample_quality_section(out_dir, runs)
    lines += quality
    lines += ["## Knowledge beyond position", "", INTRO + f" Test images: {n}.", ""]
    record: dict[str, Any] = {"sample_quality": q_record, "tasks": {}}
    tasks = list(dict.fromkeys(r["task"] for r in loaded[model][0] if r["layer"] == PRIOR))
    for task in tasks:
        sums = {label: task_summary(rows, pi, task) for label, (rows, pi) in loaded.items()}
        metric = get_task(task).primary
        m, _ = summary_table(sums)
        lines += [f"### {task} ({metric})", "", f"**{model}: {sums[model]['verdict']}.**", "", m, ""]
        diffs = []
        for other in labels[1:]:
            d = compare(loaded[model], loaded[other], task)
            cells = [str(d[k]) if d[k] is not None else MISSING for k in ("probe", "gain")]
            diffs.append(f"| {model} − {other} | {cells[0]} | {cells[1]} |")
        lines += ["Model minus each control, paired by test image (the same images for a same-image control; the "
                  "same prompt and seed for the control that draws its own):", "",
                  "| difference | best probe | gain over position |", "|---|---|---|", *diffs, ""]
        al = aligned_table(sums)
        if al:
            lines += ["Aligned depth metrics (per-image least-squares scale and shift, the label's own space):", "",
                      al[0], ""]
        elif get_task(task).kind == "regression" and task == "depth":
            lines += ["Aligned depth metrics (AbsRel, RMSE, δ<1.25): not defined for these labels. The toy depth "
                      "labeler outputs per-image z-scored inverse depth, which has no zero (neither \"at the camera\" "
                      "nor \"infinitely far\"), and generated images have no renderer depth; they are computed where "
                      "the labeler names its space (`space`: MiDaS' raw disparity on SD, exact depth from files).",
                      ""]
        m, _ = emergence_table(sums[model])
        lines += [f"Emergence of {model}'s curves relative to its prior map:", "", m, ""]
        record["tasks"][task] = {label: summary_record(s) for label, s in sums.items()}
    return lines, record, section

