"""Self-contained run reports (Markdown + HTML with the plots embedded), readable without W&B.

One report per run: the best (layer, step) per task and metric (picked on val), then its headline,
the knowledge beyond position (each task's best probe against the prior map and the plane, the gain
over position, aligned depth metrics and emergence relative to the prior map, with bootstrap
intervals: :mod:`probes.reporting.beyond_position`), then one section per task with its plots,
each under a caption that says what it shows (a reader should not have to decode file names);
when other runs are given (e.g. the permuted-weights control, or another model), a side-by-side
comparison, and each task's section opens with the runs' curves in one figure.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probes.common.files import atomic_write_text, is_regular_file, output_dir, regular_files, save_figure  # noqa: E402
from probes.metrics.baseline_rows import CLASSIFICATION, describe, is_decoded, latent_of  # noqa: E402
from probes.metrics.bootstrap import format_interval  # noqa: E402
from probes.metrics.per_image import FILE, PerImageScores  # noqa: E402
from probes.reporting.beyond_position import compare as compare_runs_paired  # noqa: E402
from probes.reporting.beyond_position import markdown_section, summary_table, task_summary  # noqa: E402
from probes.reporting.markup import MISSING, embed_png, fmt_timestep, fmt_value, html_page, table, tick_timestep  # noqa: E402
from probes.reporting.plots import HIGHLIGHT  # noqa: E402
from probes.reporting.tables import (  # noqa: E402
    NO_SELECTION,
    NOT_SCORES,
    RANDOM_WARNING,
    REFERENCE_LAYER,
    _curve,
    best_heads,
    can_select,
    emergence_step,
    read_metrics_csv,
    reported_heads,
)
from probes.tasks import LOWER_IS_BETTER, get_task  # noqa: E402

#: the decoded latent as a caption names it
LATENT_PHRASES = {"noisy": "the noisy latent x_{t-1} (as the 2024 replication)",
                  "x0": "the sampler's predicted x0 (not the replication's noisy latent)"}
METRIC_NAMES = {"dice": "Dice", "spearman": "Spearman correlation", "pearson": "Pearson correlation",
                "rmse": "RMSE", "iou": "IoU", "accuracy": "accuracy", "top1": "top-1 accuracy",
                "top5": "top-5 accuracy", "prob": "probability of the prompt's class"}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def plot_comparison(runs: dict[str, list[dict]], task: str, metric: str, path: Path, split: str = "test") -> Path:
    """One line per run: at each step the score of the layer best on val at that step (dashed: each run's
    val-picked layer). A run without validation split selects nothing: its pre-declared layer
    ``REFERENCE_LAYER`` is drawn instead (dotted)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab10")
    steps_ts: dict[int, float] = {}
    for k, (name, rows) in enumerate(runs.items()):
        env = _curve(rows, split, task, metric, None)
        if not can_select(rows):
            fixed = _curve(rows, split, task, metric, REFERENCE_LAYER)
            steps_ts.update({s: t for s, t, _ in fixed})
            if fixed:
                ax.plot([s for s, _, _ in fixed], [v for _, _, v in fixed], ":o", ms=3, color=colours(k),
                        label=f"{name}: {REFERENCE_LAYER} (pre-declared; no validation split, nothing selected)")
            continue
        if not env:
            continue
        steps_ts.update({s: t for s, t, _ in env})
        ax.plot([s for s, _, _ in env], [v for _, _, v in env], "-o", ms=3, color=colours(k),
                label=f"{name}: layer best on val at each step")
        best = [b for b in best_heads(rows) if b["task"] == task and b["metric"] == metric]
        if best:
            c = _curve(rows, split, task, metric, best[0]["layer"])
            ax.plot([s for s, _, _ in c], [v for _, _, v in c], "--", color=colours(k), alpha=0.7,
                    label=f"{name}: {best[0]['layer']} (picked on val)")
    steps = sorted(steps_ts)
    ax.set_xticks(steps)
    ax.set_xticklabels([f"{s}\n{tick_timestep(steps_ts[s])}" for s in steps], fontsize=7)
    ax.set_xlabel("denoising step (top) / scheduler timestep t (bottom)")
    ax.set_ylabel(f"{metric} ({split} split)")
    ax.set_title(f"{task}: {metric} vs step, runs compared", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _emergence_cells(e: dict) -> list[str]:
    if e["step"] is None:
        return [e["note"], MISSING, MISSING, fmt_value(e["final"])]
    return [str(e["step"]), fmt_timestep(e["timestep"]), fmt_value(e["value"]), fmt_value(e["final"])]


def task_figures(plots_dir: Path, rows: list[dict], split: str = "test") -> dict[str, list[tuple[Path, str]]]:
    """Per task, its plots in reading order, each with a caption: ``{task: [(png, caption), ...]}``.

    Found by the names ``plot_all``, ``plot_comparison`` and the panels are written under; a plot
    that is absent is skipped.
    """
    pairs = list(dict.fromkeys((r["task"], r["metric"]) for r in rows
                               if r["metric"] not in NOT_SCORES and r["task"] != CLASSIFICATION))
    decoded_latent = {(r["task"], r["metric"]): latent_of(r["layer"]) for r in rows if is_decoded(r["layer"])}
    selects = can_select(rows)
    out: dict[str, list[tuple[Path, str]]] = {}
    clf_layer = next((r["layer"] for r in rows if r["task"] == CLASSIFICATION), None)
    for task, metric in pairs:
        name = metric_name(metric)
        if task not in out:
            out[task] = [(plots_dir / f"emergence_{task}.png", emergence_caption(task, rows, clf_layer))]
        figs = out[task]
        figs.append((plots_dir / f"compare_{task}_{metric}.png",
                     f"{task.capitalize()}, {name} ({split} split), runs compared: at every step the probe of each "
                     f"run best on validation at that step (solid) and each run's probe picked on validation "
                     f"(dashed); a run without validation split: its pre-declared layer {REFERENCE_LAYER} (dotted)."))
        latent = decoded_latent.get((task, metric))
        below = (f" Below, on its own scale: the labeler run on the image decoded from "
                 f"{LATENT_PHRASES[latent]} at each step (the baseline a probe should beat early on)."
                 if latent else "")
        figs.append((plots_dir / f"{split}_{task}_{metric}_vs_step.png",
                     f"{task.capitalize()}, {name} ({split} split) of every layer's probe against the denoising step: "
                     + (f"the {HIGHLIGHT} layers with the best validation peak in colour, the others in grey.{below}"
                        if selects else f"{NO_SELECTION}, each in its fixed colour.{below}")))
        figs.append((plots_dir / f"{split}_{task}_{metric}_heatmap.png",
                     f"{task.capitalize()}, {name} ({split} split) of every (layer, step) probe: layers in forward "
                     f"order (down blocks, mid, up blocks), steps from noise (left) to image (right)."))
        figs.append((plots_dir / f"{split}_{task}_{metric}_gain_heatmap.png",
                     f"{task.capitalize()}, gain over position in {name} ({split} split) of every (layer, step): the "
                     f"head fitted on top of the prior map minus the prior map alone (red: the activations add "
                     f"something position does not explain; 0: nothing)."))
    for task in out:
        out[task].append((plots_dir / f"panel_{task}.png",
                          f"{task.capitalize()}: what the best probe (picked on validation) predicts at several "
                          f"denoising steps for a few validation images, next to the image and its label."))
    return {t: [(p, c) for p, c in figs if p.is_file()] for t, figs in out.items()}


def emergence_caption(task: str, rows: list[dict], clf_layer: str | None) -> str:
    """What the emergence figure of ``task`` shows, naming the decoded latent and the head's pick."""
    decoded = next((r["layer"] for r in rows if r["task"] == task and is_decoded(r["layer"])), None)
    parts = [f"the probe's {metric_name(get_task(task).primary)} per step (its layer "
             + ("picked on validation)" if can_select(rows) else f"pre-declared, {REFERENCE_LAYER}: no validation split)")]
    if decoded:
        parts.append(f"the task's labeler on the image decoded from {LATENT_PHRASES[latent_of(decoded)]}")
    if clf_layer:
        parts.append(f"and, on the right axis, the classifier on the image decoded from "
                     f"{LATENT_PHRASES[latent_of(clf_layer)]}: its probability of the prompt's class and its top-1 "
                     f"accuracy")
    return (f"{task.capitalize()}: when does each reader find it? On the test split, " + ", ".join(parts) + ". "
            "The replication: probes from step ~3, labelers on decoded noisy images from ~10, VGG-16 from ~11 of 15.")


def classifier_emergence(rows: list[dict], split: str = "test", fraction: float = 0.9) -> list[dict]:
    """Emergence rows (as :func:`emergence`'s) of the classifier's top-1 and class probability curves."""
    out = []
    layer = next((r["layer"] for r in rows if r["task"] == CLASSIFICATION and r["split"] == split), None)
    for metric in ("top1", "prob") if layer else ():
        e = emergence_step(_curve(rows, split, CLASSIFICATION, metric, layer), fraction)
        if e:
            out.append({"task": CLASSIFICATION, "metric": metric, "curve": describe(layer), **e})
    return out


def runs_beyond_position(run_dir: Path, compare: Sequence[Path], runs: dict[str, list[dict]], rows: list[dict],
                         per_image: PerImageScores | None) -> tuple[list[str], list[str]]:
    """Per task: every compared run against its own position baselines, and the first run minus each other
    (paired by test image)."""
    names = list(runs)
    pis = [per_image] + [PerImageScores.load(Path(c) / FILE) if (Path(c) / FILE).exists() else None for c in compare]
    loaded = {n: (runs[n], pis[k]) for k, n in enumerate(names)}
    md: list[str] = ["## Knowledge beyond position, runs compared", ""]
    hs: list[str] = ["<h2>Knowledge beyond position, runs compared</h2>"]
    for task in dict.fromkeys(r["task"] for r in rows if r["layer"] == "prior"):
        sums = {n: task_summary(r, pi, task) for n, (r, pi) in loaded.items()}
        m, h = summary_table(sums)
        diffs = []
        for other in names[1:]:
            d = compare_runs_paired(loaded[names[0]], loaded[other], task)
            diffs.append(f"{names[0]} − {other}: best probe {_iv(d['probe'])}; gain over position {_iv(d['gain'])}")
        md += [f"### {task}", "", m, "", *[f"- {d}" for d in diffs], ""]
        hs += [f"<h3>{html.escape(task)}</h3>", h, "<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in diffs) + "</ul>"]
    return md, hs


def _iv(iv) -> str:
    return format_interval(iv) if iv is not None else MISSING


def write_report(run_dir: Path, rows: list[dict], is_random: bool, compare: Sequence[Path] = (),
                 labels: Sequence[str] | None = None, title: str | None = None,
                 per_image: PerImageScores | None = None, sections: Sequence[tuple[str, str, str]] = ()
                 ) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``run_dir`` (plots from
    ``run_dir/plots``; comparison plots are written there too). Its headline is the knowledge beyond
    position (:mod:`probes.reporting.beyond_position`), with intervals from ``per_image`` (default: the
    run folder's ``per_image.npz``). ``sections``: ``(heading, Markdown, HTML)`` of what a caller
    measured beside the probes (e.g. the demo's sample quality), put first."""
    run_dir = Path(run_dir)
    name = labels[0] if labels else run_dir.name
    md: list[str] = [f"# {title or 'Probe report: ' + name}", ""]
    hs: list[str] = [f"<h1>{html.escape(title or 'Probe report: ' + name)}</h1>"]
    if is_random:
        md += ["> " + RANDOM_WARNING.replace("\n", "\n> ").replace(">       ", "> "), ""]
        hs.append(f"<p style='background:#fee;padding:6px'><b>{html.escape(RANDOM_WARNING)}</b></p>")
    for heading, section_md, section_html in sections:
        md += [f"## {heading}", "", section_md, ""]
        hs += [f"<h2>{html.escape(heading)}</h2>", section_html]

    best = best_heads(rows)
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    if not can_select(rows):
        note = (f"None: {NO_SELECTION}. The test split is never used to select; the emergence table follows the "
                f"pre-declared layer {REFERENCE_LAYER} (the published comparison point).")
        md += ["## Best (layer, step) per task and metric", "", note, ""]
        hs += ["<h2>Best (layer, step) per task and metric</h2>", f"<p>{html.escape(note)}</p>"]
    m, h = table(["task", "metric", "layer", "step", "timestep", *splits],
                  [[b["task"], b["metric"], b["layer"], b["step"], fmt_timestep(b["timestep"]),
                    *[fmt_value(b.get(s, float("nan"))) for s in splits]] for b in best])
    if best:
        md += ["## Best (layer, step) per task and metric", "", "Picked on the validation split; the test column "
               "is that head's test score.", "", m, ""]
        hs += ["<h2>Best (layer, step) per task and metric</h2><p>Picked on the validation split; the test column "
               "is that head's test score.</p>", h]

    if per_image is None and (run_dir / FILE).exists():
        per_image = PerImageScores.load(run_dir / FILE)
    md_b, hs_b = markdown_section(rows, per_image, name)
    md += md_b
    hs += hs_b
    em = classifier_emergence(rows)
    if em:
        m, h = table(["task", "metric", "curve", "emergence step", "timestep", "score there", "final score"],
                      [[e["task"], e["metric"], e["curve"], *_emergence_cells(e)] for e in em])
        definition = ("The classifier's curves have no position baseline: their emergence step is the first step "
                      "whose score reaches 90 % of the score at the last step (a curve ending below 90 % of its "
                      "peak never emerges in that sense).")
        md += ["## Emergence of the classifier on decoded images (test)", "", definition, "", m, ""]
        hs += ["<h2>Emergence of the classifier on decoded images (test)</h2>",
               f"<p>{html.escape(definition)}</p>", h]

    if compare:
        runs = {name: rows}
        for k, other in enumerate(compare):
            other = Path(other)
            csv_path = other / "metrics.csv" if other.is_dir() else other
            runs[labels[k + 1] if labels and len(labels) > k + 1 else other.name] = read_metrics_csv(csv_path)
        header = ["task", "metric"] + [f"{r} (layer, step)" for r in runs] + [f"{r} test" for r in runs]
        body = []
        pairs = [(b["task"], b["metric"]) for b in reported_heads(rows)]
        heads = {n: {(x["task"], x["metric"]): x for x in reported_heads(rrows)} for n, rrows in runs.items()}
        for task, metric in pairs:
            cells_where, cells_val = [], []
            for n in runs:
                rb = heads[n].get((task, metric))
                fixed = " (pre-declared, no val split)" if rb and rb.get("selected_on") != "val" else ""
                cells_where.append(f"{rb['layer']}, {rb['step']}{fixed}" if rb else MISSING)
                cells_val.append(fmt_value(rb.get("test", float("nan"))) if rb else MISSING)
            body.append([task, metric, *cells_where, *cells_val])
        m, h = table(header, body)
        md += ["## Runs compared", "", m, ""]
        hs += ["<h2>Runs compared</h2>", h]
        md_c, hs_c = runs_beyond_position(run_dir, compare, runs, rows, per_image)
        md += md_c
        hs += hs_c
        plots_dir = output_dir(run_dir / "plots")
        for task, metric in pairs:
            if metric in LOWER_IS_BETTER:
                continue
            plot_comparison(runs, task, metric, plots_dir / f"compare_{task}_{metric}.png")

    shown: set[Path] = set()
    for task, figs in task_figures(run_dir / "plots", rows).items():
        figs = [(path, caption) for path, caption in figs if is_regular_file(path)]   # never a planted link
        if not figs:
            continue
        md += [f"## {task.capitalize()}", ""]
        hs.append(f"<h2>{html.escape(task.capitalize())}</h2>")
        for path, caption in figs:
            shown.add(path)
            md += [f"![{caption}](plots/{path.name})", "", f"*{caption}*", ""]
            hs.append(embed_png(path, caption))
    rest = [p for p in regular_files(run_dir / "plots", "*.png") if p not in shown]
    if rest:
        md += ["## Other plots", ""]
        hs.append("<h2>Other plots</h2>")
        for p in rest:
            md += [f"![{p.stem}](plots/{p.name})", ""]
            hs.append(embed_png(p, p.stem.replace("_", " ")))
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(html_path, html_page("Probe report", hs))
    return md_path, html_path
