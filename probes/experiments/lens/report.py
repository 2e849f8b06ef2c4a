"""Outputs of a lens run: ``metrics.csv``, plots, ``report.md`` / ``report.html``, W&B.

Plots (PNG, in ``plots/``), each drawn from the long-form rows so a comparison with another run
is the same code with more series:

- ``semantic_heatmap_<metric>``: layer (forward order; combinations last) x distance, one panel
  per model (the permuted-weights control beside the model), best cell boxed;
- ``layer_ranking``: k-NN accuracy per single layer under the primary distance, model vs control,
  chance dashed; the readings of "first encoder layer at 16x16" are starred;
- ``robustness_<metric>``: one panel per transformation, metric vs strength, one line per sweep layer;
- ``timestep``, ``steps``: metric vs feature timestep / number of denoising steps;
- ``video``: instance matching (within the sequence, and against every sequence) and relative
  distance vs frame gap;
- ``tsne_<layer>``: t-SNE maps of the objects, coloured by class, model beside control.

The report states the trend of every curve as a Spearman correlation between the metric and the
*distance from the untransformed setting* (for scale, ``|log strength|``), so "monotone or not"
is a number, not an impression.
"""
from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from probes.common.csv_rows import write_csv  # noqa: E402
from probes.common.files import atomic_write_text, save_figure  # noqa: E402
from probes.experiments.lens import transforms as T  # noqa: E402
from probes.experiments.lens.distances import DEFAULT_DISTANCES  # noqa: E402
from probes.experiments.lens.experiments import COLUMNS, COMBO_SEP, control_gap, csv_rows, ranking  # noqa: E402
from probes.reporting.markup import MISSING, embed_png, fmt_value, html_page, table  # noqa: E402

ROBUSTNESS_METRICS = ("instance_matching", "class_retrieval", "relative_distance")
SWEEP_METRICS = ("relative_distance", "instance_matching", "knn_accuracy")
VIDEO_METRICS = (("instance_matching", "instance_matching_chance"),
                 ("instance_matching_all", "instance_matching_all_chance"), ("relative_distance", None))


# -- csv ------------------------------------------------------------------------------------------
def write_metrics_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    return write_csv(csv_rows(rows), COLUMNS, path, ignore_extra=False)


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{**r, "level": float(r["level"]), "value": float(r["value"]), "n": int(r["n"])}
                for r in csv.DictReader(f)]


# -- helpers -------------------------------------------------------------------------------------
def _sel(rows: Sequence[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _models(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _save(fig: Any, path: Path) -> Path:
    """Figures are made with the constrained layout: unlike tight_layout it gives a suptitle its
    own row and keeps colorbars beside their panels."""
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def deviation(factor: str, level: float, reference: float | None = None) -> float:
    """How far a sweep level is from the reference setting (the x of the trend statistic): a
    transformation's identity strength (scale: in log ratio), else ``reference`` (the feature
    timestep of a t sweep; 0 for denoising steps and frame gaps)."""
    if factor == "scale":
        return abs(math.log(level / T.get(factor).identity))
    if factor in T.TRANSFORMS:
        return abs(level - T.get(factor).identity)
    return abs(level - (reference or 0.0))


def reference_level(rows: Sequence[dict], **match: Any) -> float | None:
    """The level whose variant *is* the reference: its objects are at distance 0 from themselves."""
    zero = [r["level"] for r in _sel(rows, metric="distance", **match) if abs(r["value"]) < 1e-9]
    return zero[0] if zero else None


def trend(points: Sequence[tuple[float, float]], factor: str, reference: float | None = None) -> float:
    """Spearman correlation of the metric with the deviation from the reference setting."""
    x = [deviation(factor, lv, reference) for lv, _ in points]
    y = [v for _, v in points]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# -- plots ---------------------------------------------------------------------------------------
def forward_order(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """Single layers in ``order`` (forward order), then unknown ones, then combinations."""
    names = list(dict.fromkeys(names))
    pos = {n: k for k, n in enumerate(order)}
    singles = sorted((n for n in names if COMBO_SEP not in n), key=lambda n: pos.get(n, len(pos)))
    return singles + [n for n in names if COMBO_SEP in n]


def plot_semantic_heatmap(rows: Sequence[dict], metric: str, path: Path, starred: Sequence[str] = (),
                          order: Sequence[str] = ()) -> Path | None:
    sel = _sel(rows, experiment="semantic", metric=metric)
    if not sel:
        return None
    models = _models(sel)
    layers = forward_order([r["layers"] for r in sel], order)
    seen = list(dict.fromkeys(r["distance"] for r in sel))
    distances = [d for d in DEFAULT_DISTANCES if d in seen] + [d for d in seen if d not in DEFAULT_DISTANCES]
    fig, axes = plt.subplots(1, len(models), figsize=(2.2 + 1.1 * len(distances) * len(models),
                                                      1.2 + 0.19 * len(layers)), squeeze=False, layout="constrained")
    lower = metric in ("ratio", "intra")
    values = [r["value"] for r in sel if r["value"] == r["value"]]
    vmin, vmax = (min(values), max(values)) if values else (0, 1)
    for ax, model in zip(axes[0], models):
        grid = np.full((len(layers), len(distances)), np.nan)
        for r in _sel(sel, model=model):
            grid[layers.index(r["layers"]), distances.index(r["distance"])] = r["value"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis_r" if lower else "viridis", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(distances)), distances, rotation=30, fontsize=8)
        ax.set_yticks(range(len(layers)), [f"{l} *" if l in starred else l for l in layers], fontsize=6)
        if np.isfinite(grid).any():
            best = np.nanargmin(grid) if lower else np.nanargmax(grid)
            bi, bj = np.unravel_index(best, grid.shape)
            ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(f"{model}: {metric}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"semantic score {metric} per layer x distance ({'lower' if lower else 'higher'} is better; "
                 f"* = first encoder layer at 16x16)", fontsize=9)
    return _save(fig, path)


def plot_layer_ranking(rows: Sequence[dict], distance: str, path: Path, starred: Sequence[str] = (),
                       order: Sequence[str] = ()) -> Path | None:
    sel = [r for r in _sel(rows, experiment="semantic", distance=distance, metric="knn_accuracy")
           if COMBO_SEP not in r["layers"]]
    if not sel:
        return None
    models = _models(sel)
    layers = forward_order([r["layers"] for r in sel], order)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.17 * len(layers) + 2), 4.8), layout="constrained")
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        vals = {r["layers"]: r["value"] for r in _sel(sel, model=model)}
        ax.bar(np.arange(len(layers)) + m * width - 0.4 + width / 2, [vals.get(l, np.nan) for l in layers],
               width, label=model)
    chance = _sel(rows, experiment="semantic", distance=distance, metric="knn_chance")
    if chance:
        ax.axhline(chance[0]["value"], ls="--", color="k", lw=1, label="chance (majority class)")
    ax.set_xticks(range(len(layers)), [f"{l} *" if l in starred else l for l in layers], rotation=90, fontsize=6)
    ax.set_ylabel(f"leave-one-out 1-NN class accuracy ({distance})")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_title("semantic score per layer (forward order; * = first encoder layer at 16x16)", fontsize=9, loc="left")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _curves(ax: Any, rows: Sequence[dict], metric: str, chance_metric: str | None, xlabel: str,
            log_x: bool = False) -> None:
    sel = _sel(rows, metric=metric)
    colours = plt.get_cmap("tab10")
    series = list(dict.fromkeys((r["model"], r["layers"]) for r in sel))
    for k, (model, layer) in enumerate(series):
        pts = sorted((r["level"], r["value"]) for r in sel if r["model"] == model and r["layers"] == layer)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=colours(k % 10),
                label=f"{layer}" if len(_models(sel)) == 1 else f"{model}: {layer}")
    if chance_metric:
        ch = sorted({(r["level"], r["value"]) for r in _sel(rows, metric=chance_metric)})
        if ch:
            ax.plot([p[0] for p in ch], [p[1] for p in ch], "--", color="gray", lw=1, label="chance")
    if log_x:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


CHANCE_OF = {"instance_matching": "instance_matching_chance", "class_retrieval": "class_retrieval_chance",
             "knn_accuracy": "knn_chance", "relative_distance": None}


def plot_robustness(rows: Sequence[dict], metric: str, distance: str, path: Path) -> Path | None:
    sel = _sel(rows, experiment="robustness", distance=distance)
    factors = list(dict.fromkeys(r["factor"] for r in sel))
    if not _sel(sel, metric=metric):
        return None
    cols = min(4, len(factors))
    nrows = math.ceil(len(factors) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.8 * nrows), squeeze=False, layout="constrained")
    for ax, factor in zip(axes.flat, factors):
        _curves(ax, _sel(sel, factor=factor), metric, CHANCE_OF.get(metric), f"{factor} strength")
        ax.set_title(factor, fontsize=9)
    for ax in list(axes.flat)[len(factors):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"robustness: {metric} of transformed objects vs the untransformed gallery ({distance})", fontsize=9)
    return _save(fig, path)


def plot_sweep(rows: Sequence[dict], experiment: str, distance: str, path: Path, xlabel: str) -> Path | None:
    sel = _sel(rows, experiment=experiment, distance=distance)
    if not sel:
        return None
    metrics = [m for m in SWEEP_METRICS if _sel(sel, metric=m)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], metrics):
        _curves(ax, sel, metric, CHANCE_OF.get(metric), xlabel)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{experiment} sweep vs the reference setting ({distance})", fontsize=9)
    return _save(fig, path)


def plot_video(rows: Sequence[dict], distance: str, path: Path) -> Path | None:
    sel = _sel(rows, experiment="video", distance=distance)
    if not sel:
        return None
    fig, axes = plt.subplots(1, len(VIDEO_METRICS), figsize=(3.6 * len(VIDEO_METRICS), 3.2), squeeze=False, layout="constrained")
    for ax, (metric, chance) in zip(axes[0], VIDEO_METRICS):
        _curves(ax, sel, metric, chance, "frame gap")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"video: the same objects across frames ({distance})", fontsize=9)
    return _save(fig, path)


def tsne_map(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``x`` (rows L2-normalised first, so the map shows directions as the cosine
    distance does); perplexity is capped for small sets, where scikit-learn refuses the default."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_tsne(objects: dict[str, Any], layer: str, path: Path, class_names: dict[int, str] | None) -> Path | None:
    from probes.experiments.lens.experiments import combination

    models = [m for m, o in objects.items() if layer.split(COMBO_SEP)[0] in o.vectors and len(o) >= 5]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False, layout="constrained")
    colours = plt.get_cmap("tab10")
    for ax, model in zip(axes[0], models):
        objs = objects[model]
        xy = tsne_map(combination(objs, layer))
        for c, label in enumerate(sorted(set(objs.label.tolist()))):
            pick = objs.label == label
            name = class_names.get(label, str(label)) if class_names and label >= 0 else str(label)
            ax.scatter(xy[pick, 0], xy[pick, 1], s=8, color=colours(c % 10), label=name, alpha=0.8)
        ax.set_title(f"{model}: {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=2)
    fig.suptitle("t-SNE of object embeddings, coloured by class", fontsize=9)
    return _save(fig, path)


def write_plots(rows: Sequence[dict], out: Path, distance: str, starred: Sequence[str] = (),
                objects: dict[str, Any] | None = None, tsne_layers: Sequence[str] = (),
                class_names: dict[int, str] | None = None, order: Sequence[str] = ()) -> list[Path]:
    """Every plot of the module docstring that the rows support, into ``out`` (layers listed in
    ``order``, the forward order)."""
    plots = out / "plots"
    made = [plot_semantic_heatmap(rows, m, plots / f"semantic_heatmap_{m}.png", starred, order)
            for m in ("knn_accuracy", "map", "ratio")]
    made.append(plot_layer_ranking(rows, distance, plots / "layer_ranking.png", starred, order))
    made += [plot_robustness(rows, m, distance, plots / f"robustness_{m}.png") for m in ROBUSTNESS_METRICS]
    made.append(plot_sweep(rows, "timestep", distance, plots / "timestep.png", "feature timestep t"))
    made.append(plot_sweep(rows, "steps", distance, plots / "steps.png", "denoising steps before the feature pass"))
    made.append(plot_video(rows, distance, plots / "video.png"))
    for layer in tsne_layers if objects else ():
        made.append(plot_tsne(objects, layer, plots / f"tsne_{layer.replace(COMBO_SEP, '_')}.png", class_names))
    return [p for p in made if p is not None]


# -- tables and the report ---------------------------------------------------------------------
def trend_rows(rows: Sequence[dict], distance: str, metric: str = "instance_matching") -> list[dict[str, Any]]:
    """Per (experiment, factor, model, layer): the metric at the reference and at the strongest
    setting, and its Spearman trend against the deviation from the reference."""
    out = []
    sel = [r for r in rows if r["experiment"] in ("robustness", "timestep", "steps", "video")
           and r["distance"] == distance and r["metric"] == metric]
    for key in dict.fromkeys((r["experiment"], r["factor"], r["model"], r["layers"]) for r in sel):
        exp, factor, model, layer = key
        pts = sorted((r["level"], r["value"]) for r in sel
                     if (r["experiment"], r["factor"], r["model"], r["layers"]) == key)
        ref = reference_level(rows, experiment=exp, factor=factor, model=model, layers=layer, distance=distance)
        far = max(pts, key=lambda p: deviation(factor, p[0], ref))
        near = min(pts, key=lambda p: deviation(factor, p[0], ref))
        out.append({"experiment": exp, "factor": factor, "model": model, "layers": layer, "reference": near[0],
                    "at_reference": near[1], "strongest": far[0], "at_strongest": far[1],
                    "spearman": trend(pts, factor, ref)})
    return out


METRIC_WORDS = {"knn_accuracy": "k-NN class accuracy", "map": "class retrieval mAP",
                "ratio": "intra-class / inter-class distance ratio", "instance_matching": "instance matching",
                "class_retrieval": "class retrieval", "relative_distance": "relative distance"}


def plot_caption(stem: str, distance: str) -> str:
    """A plot's caption in words, from its file name (the stems :func:`write_plots` gives)."""
    def metric(name: str) -> str:
        return METRIC_WORDS.get(name, name.replace("_", " "))

    if stem.startswith("semantic_heatmap_"):
        return (f"{metric(stem.removeprefix('semantic_heatmap_'))} per layer (rows, forward order) and distance "
                "(columns), the model beside its permuted-weights control; the best cell is boxed")
    if stem == "layer_ranking":
        return (f"k-NN class accuracy of every single layer under the {distance} distance, model against control, "
                "chance dashed; stars mark the readings of \"first encoder layer at 16x16\"")
    if stem.startswith("robustness_"):
        return (f"{metric(stem.removeprefix('robustness_'))} against the strength of each image transformation "
                f"(one panel each), one line per sweep layer ({distance} distance)")
    if stem == "timestep":
        return f"how the features' timestep t changes matching and retrieval ({distance} distance)"
    if stem == "steps":
        return f"how the number of denoising steps before the feature pass changes them ({distance} distance)"
    if stem == "video":
        return ("video frames: instance matching within the sequence and against every sequence, and relative "
                f"distance, against the gap between frames ({distance} distance)")
    if stem.startswith("tsne_"):
        return f"t-SNE map of the objects' features at layer {stem.removeprefix('tsne_')}, coloured by class, model beside control"
    return stem.replace("_", " ")


def summary(rows: Sequence[dict], distance: str, labels: Sequence[str]) -> dict[str, Any]:
    """The numbers the issue's bars are judged on."""
    out: dict[str, Any] = {}
    models = _models(rows)
    if labels[0] in models and _sel(rows, experiment="semantic", model=labels[0]):
        out["ranking"] = ranking(rows, distance, model=labels[0])
        if len(labels) > 1 and labels[1] in models:
            out["control"] = control_gap(rows, distance, labels[1], labels[0])
    return out


def write_report(out: Path, rows: Sequence[dict], plots: Sequence[Path], distance: str, labels: Sequence[str],
                 meta: dict[str, Any], first_at_16: dict[str, str] | None = None) -> tuple[Path, Path]:
    """``report.md`` and a self-contained ``report.html`` (plots embedded)."""
    md: list[str] = [f"# Semantic lens: {meta.get('title', out.name)}", ""]
    hs: list[str] = [f"<h1>Semantic lens: {html.escape(str(meta.get('title', out.name)))}</h1>"]

    def add(text: str) -> None:
        md.extend([text, ""])
        hs.append(f"<p>{html.escape(text)}</p>")

    def section(title: str, header: list[str], body: list[list]) -> None:
        m, h = table(header, body)
        md.extend([f"## {title}", "", m, ""])
        hs.extend([f"<h2>{html.escape(title)}</h2>", h])

    if meta.get("warning"):
        md.extend([f"> {meta['warning']}", ""])
        hs.append(f"<p style='background:#fee;padding:6px'><b>{html.escape(meta['warning'])}</b></p>")
    settings = [[key, value] for key, value in meta.items() if key not in ("title", "warning")]
    if settings:
        section("What was run", ["setting", "as run"], settings)
    s = summary(rows, distance, labels)
    if "control" in s:
        c = s["control"]
        section("Best layer vs the permuted-weights control",
              ["layer", "distance", f"{labels[0]} k-NN acc", f"{labels[1]} k-NN acc", "gap", "chance"],
              [[c["layer"], c["distance"], fmt_value(c["model_knn"]), fmt_value(c["control_knn"]), fmt_value(c["gap"]),
                fmt_value(c["chance"])]])
    if "ranking" in s:
        top = s["ranking"][:15]
        get = lambda layer, metric, model=labels[0]: next((r["value"] for r in _sel(  # noqa: E731
            rows, experiment="semantic", model=model, layers=layer, distance=distance, metric=metric)), float("nan"))
        section(f"Layer ranking ({distance}; single layers and combinations)",
              ["rank", "layers", "k-NN acc", "mAP", "mAP chance", "intra/inter ratio"],
              [[k + 1, n, fmt_value(v), fmt_value(get(n, "map")), fmt_value(get(n, "map_chance")), fmt_value(get(n, "ratio"))]
               for k, (n, v) in enumerate(top)])
        if first_at_16:
            section("Readings of \"first encoder layer at 16x16\" (the paper's best layer)",
                  ["reading", "layer", "k-NN acc", "rank among single layers"],
                  [[kind, name, fmt_value(get(name, "knn_accuracy")),
                    next((k + 1 for k, (n, _) in enumerate(r for r in s["ranking"] if COMBO_SEP not in r[0])
                          if n == name), MISSING)]
                   for kind, name in first_at_16.items()])
    tr = trend_rows(rows, distance)
    if tr:
        section(f"Trends of instance matching ({distance}): Spearman vs deviation from the reference",
              ["experiment", "factor", "model", "layers", "reference level", "matching at reference",
               "farthest level", "matching at farthest", "spearman"],
              [[t["experiment"], t["factor"], t["model"], t["layers"], f"{t['reference']:g}", fmt_value(t["at_reference"]),
                f"{t['strongest']:g}", fmt_value(t["at_strongest"]), fmt_value(t["spearman"])] for t in tr])
        add("A negative Spearman means matching falls as the setting moves away from the reference (a monotone "
            "loss); values near 0 mean no monotone trend: read the curve (flips have one strength only, and "
            "a sweep that never hurts matching stays flat at 1).")
    for p in plots:
        words = plot_caption(p.stem, distance)
        md.extend([f"![{words}](plots/{p.name})", "", f"*{words}*", ""])
        hs.extend([embed_png(p), f"<p><i>{html.escape(words)}</i></p>"])
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(html_path, html_page("Semantic lens", hs))
    return md_path, html_path


def log_wandb(run: Any, rows: Sequence[dict], plots: Sequence[Path], distance: str,
              labels: Sequence[str]) -> dict[str, Any]:
    """Send the run to W&B (a run from :func:`probes.reporting.wandb_logger.start_wandb_run`, or
    anything with a ``log``): ``lens/metrics`` table, ``lens/best/*`` and ``lens/control/*`` scalars,
    ``plots/<name>`` images. Returns the payload (tests read it)."""
    import wandb

    payload: dict[str, Any] = {"lens/metrics": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS]
                                                                                  for r in csv_rows(rows)])}
    s = summary(rows, distance, labels)
    if "ranking" in s and s["ranking"]:
        payload["lens/best/layers"] = s["ranking"][0][0]
        payload["lens/best/knn_accuracy"] = s["ranking"][0][1]
    for key, value in s.get("control", {}).items():
        payload[f"lens/control/{key}"] = value
    for p in plots:
        payload[f"plots/{p.stem}"] = wandb.Image(str(p))
    run.log(payload)
    return payload
