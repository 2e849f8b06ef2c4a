"""Self-contained run reports (Markdown + HTML with the plots embedded), readable without W&B.

One report per run: the best (layer, step) per task and metric (picked on val), the step at
which each task first reaches 90 % of its final score, then one section per task with its plots,
each under a caption that says what it shows (a reader should not have to decode file names);
when other runs are given (e.g. the permuted-weights control, or another model), a side-by-side
comparison, and each task's section opens with the runs' curves in one figure.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probes.reporting.plots import HIGHLIGHT  # noqa: E402
from probes.reporting.tables import (  # noqa: E402
    LOWER_IS_BETTER,
    NOT_SCORES,
    RANDOM_WARNING,
    _curve,
    best_heads,
    emergence,
    fmt_timestep,
    fmt_value,
    read_metrics_csv,
    tick_timestep,
)

METRIC_NAMES = {"dice": "Dice", "spearman": "Spearman correlation", "pearson": "Pearson correlation",
                "rmse": "RMSE", "iou": "IoU", "accuracy": "accuracy"}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def _table(header: list[str], rows: list[list]) -> tuple[str, str]:
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    h = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    return "\n".join(md), h


def _fmt(v: float) -> str:
    return fmt_value(v)


def plot_comparison(runs: dict[str, list[dict]], task: str, metric: str, path: Path, split: str = "test") -> Path:
    """One line per run: the per-step best layer's score vs step (dashed: each run's val-picked layer)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab10")
    steps_ts: dict[int, float] = {}
    for k, (name, rows) in enumerate(runs.items()):
        env = _curve(rows, split, task, metric, None)
        if not env:
            continue
        steps_ts.update({s: t for s, t, _ in env})
        ax.plot([s for s, _, _ in env], [v for _, _, v in env], "-o", ms=3, color=colours(k), label=f"{name}: best layer per step")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _emergence_cells(e: dict) -> list[str]:
    if e["step"] is None:
        return [e["note"], "-", "-", _fmt(e["final"])]
    return [str(e["step"]), fmt_timestep(e["timestep"]), _fmt(e["value"]), _fmt(e["final"])]


def task_figures(plots_dir: Path, rows: list[dict], split: str = "test") -> dict[str, list[tuple[Path, str]]]:
    """Per task, its plots in reading order, each with a caption: ``{task: [(png, caption), ...]}``.

    Found by the names ``plot_all``, ``plot_comparison`` and the panels are written under; a plot
    that is absent is skipped.
    """
    pairs = list(dict.fromkeys((r["task"], r["metric"]) for r in rows if r["metric"] not in NOT_SCORES))
    has_decoded = {(r["task"], r["metric"]) for r in rows if r["layer"] == "decoded_x0"}
    out: dict[str, list[tuple[Path, str]]] = {}
    for task, metric in pairs:
        name = metric_name(metric)
        figs = out.setdefault(task, [])
        figs.append((plots_dir / f"compare_{task}_{metric}.png",
                     f"{task.capitalize()}, {name} ({split} split), runs compared: at every step the best probe of "
                     f"each run (solid) and each run's probe picked on validation (dashed)."))
        below = (" Below, on its own scale: the labeler run on the image decoded from the predicted x0 at each step "
                 "(the baseline a probe should beat early on)." if (task, metric) in has_decoded else "")
        figs.append((plots_dir / f"{split}_{task}_{metric}_vs_step.png",
                     f"{task.capitalize()}, {name} ({split} split) of every layer's probe against the denoising step: "
                     f"the {HIGHLIGHT} layers with the best validation peak in colour, the others in grey.{below}"))
        figs.append((plots_dir / f"{split}_{task}_{metric}_heatmap.png",
                     f"{task.capitalize()}, {name} ({split} split) of every (layer, step) probe: layers in forward "
                     f"order (down blocks, mid, up blocks), steps from noise (left) to image (right)."))
    for task in out:
        out[task].append((plots_dir / f"panel_{task}.png",
                          f"{task.capitalize()}: what the best probe (picked on validation) predicts at several "
                          f"denoising steps for a few validation images, next to the image and its label."))
    return {t: [(p, c) for p, c in figs if p.is_file()] for t, figs in out.items()}


def write_report(run_dir: Path, rows: list[dict], is_random: bool, compare: Sequence[Path] = (),
                 labels: Sequence[str] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``run_dir`` (plots from
    ``run_dir/plots``; comparison plots are written there too)."""
    run_dir = Path(run_dir)
    name = labels[0] if labels else run_dir.name
    md: list[str] = [f"# {title or 'Probe report: ' + name}", ""]
    hs: list[str] = [f"<h1>{html.escape(title or 'Probe report: ' + name)}</h1>"]
    if is_random:
        md += ["> " + RANDOM_WARNING.replace("\n", "\n> ").replace(">       ", "> "), ""]
        hs.append(f"<p style='background:#fee;padding:6px'><b>{html.escape(RANDOM_WARNING)}</b></p>")

    best = best_heads(rows)
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    m, h = _table(["task", "metric", "layer", "step", "timestep", *splits],
                  [[b["task"], b["metric"], b["layer"], b["step"], fmt_timestep(b["timestep"]),
                    *[_fmt(b.get(s, float("nan"))) for s in splits]] for b in best])
    md += ["## Best (layer, step) per task and metric", "", "Picked on the validation split; the test column is "
           "that head's test score.", "", m, ""]
    hs += ["<h2>Best (layer, step) per task and metric</h2><p>Picked on the validation split; the test column is "
           "that head's test score.</p>", h]

    em = emergence(rows)
    m, h = _table(["task", "metric", "curve", "emergence step", "timestep", "score there", "final score"],
                  [[e["task"], e["metric"], e["curve"], *_emergence_cells(e)] for e in em])
    definition = ("The emergence step is the first step whose score reaches 90 % of the score at the last step. "
                  "A curve whose last score is below 90 % of its peak never emerges in that sense: the table "
                  "says where it peaks and that it declines. A curve ending at or below 0 never emerges.")
    md += ["## Emergence: first step reaching 90 % of the final score (test)", "", definition, "", m, ""]
    hs += ["<h2>Emergence: first step reaching 90 % of the final score (test)</h2>",
           f"<p>{html.escape(definition)}</p>", h]

    if compare:
        runs = {name: rows}
        for k, other in enumerate(compare):
            other = Path(other)
            csv_path = other / "metrics.csv" if other.is_dir() else other
            runs[labels[k + 1] if labels and len(labels) > k + 1 else other.name] = read_metrics_csv(csv_path)
        header = ["task", "metric"] + [f"{r} (layer, step)" for r in runs] + [f"{r} test" for r in runs]
        body = []
        for b in best:
            cells_where, cells_val = [], []
            for rrows in runs.values():
                rb = [x for x in best_heads(rrows) if x["task"] == b["task"] and x["metric"] == b["metric"]]
                cells_where.append(f"{rb[0]['layer']}, {rb[0]['step']}" if rb else "-")
                cells_val.append(_fmt(rb[0].get("test", float("nan"))) if rb else "-")
            body.append([b["task"], b["metric"], *cells_where, *cells_val])
        m, h = _table(header, body)
        md += ["## Runs compared", "", m, ""]
        hs += ["<h2>Runs compared</h2>", h]
        for b in best:
            if b["metric"] in LOWER_IS_BETTER:
                continue
            plot_comparison(runs, b["task"], b["metric"], run_dir / "plots" / f"compare_{b['task']}_{b['metric']}.png")

    shown: set[Path] = set()
    for task, figs in task_figures(run_dir / "plots", rows).items():
        if not figs:
            continue
        md += [f"## {task.capitalize()}", ""]
        hs.append(f"<h2>{html.escape(task.capitalize())}</h2>")
        for path, caption in figs:
            shown.add(path)
            md += [f"![{caption}](plots/{path.name})", "", f"*{caption}*", ""]
            hs.append(_img(path, caption))
    rest = [p for p in sorted((run_dir / "plots").glob("*.png")) if p not in shown]
    if rest:
        md += ["## Other plots", ""]
        hs.append("<h2>Other plots</h2>")
        for p in rest:
            md += [f"![{p.stem}](plots/{p.name})", ""]
            hs.append(_img(p, p.stem.replace("_", " ")))
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>Probe report</title><style>"
                         "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
                         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}"
                         "figcaption{font-size:13px;color:#333;margin:2px 0 18px}</style>"
                         "</head><body>" + "\n".join(hs) + "</body></html>")
    return md_path, html_path


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
