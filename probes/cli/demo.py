"""``make demo``: the protocol on the toy world's trained model and on its permuted control, side by side.

Both runs are ordinary ``train.py fit`` runs (``configs/toy/demo.yaml`` and ``control.yaml``);
this only chains them and puts the answer to "does the model know?" in one place: sample quality
(do the samples show what their captions say: shape, colour, left/right, with intervals and chance), the model's best heads against the permuted-weights
control and the position-only baseline, and the emergence steps, then a comparison report.
"""
from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from pathlib import Path

from probes.common.files import atomic_write_text
from probes.paths import REPO_ROOT
from probes.reporting.markup import fmt_cell

RUNS = (("toy model", "model", "configs/toy/demo.yaml"),
        ("permuted weights", "control", "configs/toy/control.yaml"))
#: the replication's classifier experiment, run beside the comparison (not a control: its prompts are
#: one-object scenes with a class, which the classifier is scored against): (label, folder, config)
CLASSIFIER_RUN = ("toy model, one-object prompts with a class", "classifier", "configs/toy/classifier.yaml")


def demo(out: str = "outputs/demo", overrides: Sequence[str] = (), runs: Sequence[tuple[str, str, str]] = RUNS,
         classifier_run: tuple[str, str, str] | None = CLASSIFIER_RUN) -> Path:
    """Run every config of ``runs`` into ``out/<folder>``, then compare them in ``out/comparison.md``.

    :param out: output folder (one run folder per config, ``comparison.md``, ``summary.json``, ``report/``).
    :param overrides: extra command-line options for every run (e.g. ``--data.prompts.limit 8``).
    :param runs: ``(label, folder, config)`` triples; the first is the model, the others its controls.
    :param classifier_run: the classifier experiment's ``(label, folder, config)`` (None: skipped); its
        per-step classifier scores go into ``comparison.md``, its emergence figures into its own report.
    """
    from probes.cli.evaluate import comparison_report
    from probes.cli.train import train_main
    from probes.experiments.toy.sample_quality import BARS_NOTE, quality_table, store_sample_quality
    from probes.reporting.baselines import compare_runs, comparison_markdown
    from probes.reporting.tables import emergence, read_metrics_csv
    from probes.store.activations import ActivationStore

    out_dir = Path(out)
    seconds = {}
    for _, folder, config in runs:
        t0 = time.perf_counter()
        train_main(["fit", "--config", str(REPO_ROOT / config), "--run_dir", str(out_dir / folder), *overrides])
        seconds[folder] = time.perf_counter() - t0
    classifier_lines: list[str] = []
    if classifier_run is not None:
        label, folder, config = classifier_run
        t0 = time.perf_counter()
        train_main(["fit", "--config", str(REPO_ROOT / config), "--run_dir", str(out_dir / folder), *overrides])
        seconds[folder] = time.perf_counter() - t0
        clf = [r for r in read_metrics_csv(out_dir / folder / "metrics.csv") if r["task"] == "classification"]
        per_step = {(r["metric"], r["step"]): r["value"] for r in clf}
        steps = sorted({r["step"] for r in clf})
        classifier_lines = [
            f"## The classifier on decoded images ({label}: `{config}`)", "",
            f"The toy shape classifier on the image decoded after each step ({clf[0]['layer'] if clf else '-'}), "
            f"test split, against the prompt's shape (chance top-1: 0.25). Emergence figures: "
            f"`{folder}/report.html`.", "",
            "| step | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps),
            *[f"| {m} | " + " | ".join(fmt_cell(per_step.get((m, s))) for s in steps) + " |" for m in ("top1", "prob")], ""]
    rows = {label: read_metrics_csv(out_dir / folder / "metrics.csv") for label, folder, _ in runs}
    labels = [label for label, _, _ in runs]
    comparison = compare_runs(rows)
    qualities = {label: store_sample_quality(ActivationStore((out_dir / folder / "store").resolve()))
                 for label, folder, _ in runs}
    quality = qualities[labels[0]]
    quality_md, quality_html = quality_table(qualities)
    quality_intro = (f"Images generated per model: {int(quality['images'])} (the stores' own images). Measured with "
                     "the toy world's own models (trained on renders): in one-object scenes, is the shape classifier's "
                     "top shape the caption's, and is the colour most object pixels show the caption's; in two-object "
                     "scenes of two colours, is the first-named colour left of the second as drawn?")
    em = emergence(rows[labels[0]])
    lines = [f"# Demo: {labels[0]} vs {', '.join(labels[1:])}", "",
             "## Do the samples show what their captions say?", "",
             quality_intro, "", quality_md, "", BARS_NOTE, "",
             "## Best heads (picked on validation, scored on test) against the controls", "",
             comparison_markdown(comparison, labels), "",
             "## Emergence (first step reaching 90 % of the final score, test)", "",
             "| task | metric | curve | step | score there | final | note |", "|---|---|---|---|---|---|---|",
             *[f"| {e['task']} | {e['metric']} | {e['curve']} | {fmt_cell(e.get('step'))} | {fmt_cell(e.get('value'))} | "
               f"{fmt_cell(e.get('final'))} | {e.get('note', '')} |" for e in em], "",
             *classifier_lines,
             "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    atomic_write_text(out_dir / "comparison.md", "\n".join(lines))
    atomic_write_text(out_dir / "summary.json", json.dumps(
        {"sample_quality": qualities, "comparison": comparison, "emergence": em, "seconds": seconds}, indent=1, default=str))
    comparison_report([str(out_dir / folder) for _, folder, _ in runs], labels, str(out_dir / "report"),
                      sections=[("Do the samples show what their captions say?", "\n\n".join([quality_intro, quality_md, BARS_NOTE]),
                                 f"<p>{html.escape(quality_intro)}</p>{quality_html}<p>{html.escape(BARS_NOTE)}</p>")])
    print("\n".join(lines), flush=True)
    print(f"Demo outputs: {out_dir.resolve()} (comparison.md, report/report.html, one run folder per model)")
    return out_dir


