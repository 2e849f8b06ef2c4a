"""Self-contained run reports (Markdown + HTML with the plots embedded), readable without W&B.

One report per run: the best (layer, step) per task and metric (picked on val), the step at
which each task first reaches 90 % of its final score, the plots, and, when other runs are
given (e.g. the permuted-weights control, or another model), a side-by-side comparison.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probes.reporting.tables import LOWER_IS_BETTER, RANDOM_WARNING, _curve, best_heads, emergence, read_metrics_csv  # noqa: E402


def _table(header: list[str], rows: list[list]) -> tuple[str, str]:
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    h = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    return "\n".join(md), h


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.3f}"


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
    ax.set_xticklabels([f"{s}\n{steps_ts[s]:.0f}" for s in steps], fontsize=7)
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


def write_report(run_dir: Path, rows: list[dict], is_random: bool, compare: Sequence[Path] = (),
                 labels: Sequence[str] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``run_dir``."""
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
                  [[b["task"], b["metric"], b["layer"], b["step"], f"{b['timestep']:.1f}", *[_fmt(b.get(s, float('nan'))) for s in splits]]
                   for b in best])
    md += ["## Best (layer, step) per task and metric", "", "Picked on the validation split; the test column is "
           "that head's test score.", "", m, ""]
    hs += ["<h2>Best (layer, step) per task and metric</h2><p>Picked on the validation split; the test column is "
           "that head's test score.</p>", h]

    em = emergence(rows)
    m, h = _table(["task", "metric", "curve", "emergence step", "timestep", "score there", "final score"],
                  [[e["task"], e["metric"], e["curve"], e["step"], f"{e['timestep']:.1f}", _fmt(e["value"]), _fmt(e["final"])]
                   for e in em])
    md += ["## Emergence: first step reaching 90 % of the final score (test)", "", m, ""]
    hs += ["<h2>Emergence: first step reaching 90 % of the final score (test)</h2>", h]

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
            p = plot_comparison(runs, b["task"], b["metric"], run_dir / "plots" / f"compare_{b['task']}_{b['metric']}.png")
            md.append(f"![{b['task']} {b['metric']} compared](plots/{p.name})")
            hs.append(_img(p))

    md += ["", "## Plots", ""]
    hs.append("<h2>Plots</h2>")
    for p in sorted((run_dir / "plots").glob("*.png")):
        if p.name.startswith("compare_"):
            continue
        md.append(f"![{p.stem}](plots/{p.name})")
        hs.append(_img(p))
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>Probe report</title><style>"
                         "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
                         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style>"
                         "</head><body>" + "\n".join(hs) + "</body></html>")
    return md_path, html_path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.stem)}'><figcaption>{html.escape(path.stem)}</figcaption></figure>"

