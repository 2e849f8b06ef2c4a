"""Plots people look at instead of reading tables: metric vs step, and layer x step heatmaps.

Colours are fixed per layer (by its position in forward order, the same in every plot and
run), the x axis shows the step index with the scheduler timestep beneath it, and every axis
is labelled. Input is the long-form rows of ``metrics.csv``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probes.common.files import save_figure  # noqa: E402
from probes.metrics.baseline_rows import CLASSIFICATION, PRIOR, describe, is_decoded, latent_of  # noqa: E402
from probes.reporting.markup import fmt_value, tick_timestep  # noqa: E402
from probes.reporting.tables import (  # noqa: E402
    NO_SELECTION,
    NOT_PROBES,
    NOT_SCORES,
    _curve,
    best_heads,
    reported_heads,
)
from probes.tasks import LOWER_IS_BETTER, get_task  # noqa: E402

#: reference points (replication, last step, up3.0) drawn as a dashed line where they apply
#: the model the published numbers are of (Chen et al. 2023 and the 2024 replication)
PUBLISHED_MODELS = ("CompVis/stable-diffusion-v1-4",)
PUBLISHED = {("foreground", "dice"): 0.85, ("depth", "spearman"): 0.71, ("depth", "pearson"): 0.74,
             ("shading", "spearman"): 0.62, ("shading", "pearson"): 0.64}


def layer_colours(layers: Sequence[str]) -> dict[str, tuple]:
    """Down blocks in blues, mid in black, up blocks in oranges/reds: stable across plots."""
    cmap_down, cmap_up = plt.get_cmap("Blues"), plt.get_cmap("Oranges")
    down = [l for l in layers if l.startswith("down")]
    up = [l for l in layers if l.startswith("up")]
    out = {}
    for k, l in enumerate(down):
        out[l] = cmap_down(0.35 + 0.6 * k / max(len(down) - 1, 1))
    for k, l in enumerate(up):
        out[l] = cmap_up(0.35 + 0.6 * k / max(len(up) - 1, 1))
    for l in layers:
        out.setdefault(l, (0, 0, 0, 1))
    return out


def _select(rows: Iterable[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _step_axis(ax, steps: list[int], timesteps: list[float]) -> None:
    ax.set_xticks(steps)
    ax.set_xticklabels([f"{s}\n{tick_timestep(t)}" for s, t in zip(steps, timesteps)], fontsize=7)
    ax.tick_params(labelbottom=True)
    ax.set_xlabel("denoising step (top) / scheduler timestep t (bottom)")


HIGHLIGHT = 3


def rank_layers(rows: list[dict], task: str, metric: str, split: str) -> list[str]:
    """Probe layers, best first, by their peak score over steps on the validation split (the split
    every selection uses), so the highlighted layers of a test plot are not picked on test. Empty
    when there is no validation split: nothing is ranked (``split`` is never used to rank)."""
    if not _has_val(rows, task, metric):
        return []
    pick = "val"
    peaks: dict[str, float] = {}
    lower = metric in LOWER_IS_BETTER
    for r in rows:
        if r["split"] == pick and r["task"] == task and r["metric"] == metric and r["layer"] not in NOT_PROBES:
            v = r["value"]
            if v != v:
                continue
            old = peaks.get(r["layer"])
            peaks[r["layer"]] = v if old is None else (min(old, v) if lower else max(old, v))
    return sorted(peaks, key=lambda l: peaks[l], reverse=not lower)


def plot_metric_vs_step(rows: list[dict], split: str, task: str, metric: str, path: Path,
                        title_suffix: str = "", highlight: int = HIGHLIGHT, published: bool = False) -> Path:
    """Metric vs step: the ``highlight`` best layers in colour, the others thin and grey.

    Sixteen coloured lines cannot be told apart, and the question is usually "which layers, from
    which step": so the best few (peak on val) are drawn in distinct colours and the rest as grey
    context. The labeler on decoded images (noisy latent or predicted x0, named in the legend)
    lives on another scale (it starts near 0 and ends near 1), so it gets a panel of its own
    below, with the best layer repeated there for comparison; it would otherwise squash the
    probe lines into a band.
    """
    sel = _select(rows, split=split, task=task, metric=metric)
    probes = [l for l in dict.fromkeys(r["layer"] for r in sel) if l not in NOT_PROBES]
    ranked = [l for l in rank_layers(rows, task, metric, split) if l in probes]
    top = ranked[:highlight]
    decoded_layer = next((r["layer"] for r in sel if is_decoded(r["layer"])), None)
    decoded = sorted((r["step"], r["value"]) for r in sel if r["layer"] == decoded_layer)
    steps = sorted({r["step"] for r in sel})
    ts = {r["step"]: r["timestep"] for r in sel}
    if decoded:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.6), sharex=True, gridspec_kw={"height_ratios": [2.4, 1]})
    else:
        fig, ax = plt.subplots(figsize=(9, 5))
        ax2 = None
    curve = {l: sorted((r["step"], r["value"]) for r in sel if r["layer"] == l) for l in probes}
    others = [l for l in probes if l not in top]
    if not _has_val(rows, task, metric):   # nothing ranked: every layer in its fixed colour, none singled out
        colours = layer_colours(probes)
        for layer in probes:
            pts = curve[layer]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=1.2, marker="o", ms=2.5, color=colours[layer],
                    label=layer)
        others = []
        title_suffix = f" ({NO_SELECTION}){title_suffix}"
    for k, layer in enumerate(others):
        pts = curve[layer]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=0.8, color="0.72", zorder=1,
                label=f"other layers ({len(others)})" if k == 0 else None)
    highlight_colours = plt.get_cmap("tab10")
    for k, layer in enumerate(top):
        pts = curve[layer]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=2.2, marker="o", ms=4, zorder=3,
                color=highlight_colours(k), label=f"{layer} (#{k + 1} on {'val' if _has_val(rows, task, metric) else split})")
    for layer in dict.fromkeys(r["layer"] for r in sel):
        if layer in NOT_PROBES and not is_decoded(layer):
            pts = sorted((r["step"], r["value"]) for r in sel if r["layer"] == layer)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1.6, color="black", zorder=2,
                    label=describe(layer))
    ref = PUBLISHED.get((task, metric)) if published else None      # SD v1.4's numbers: only on SD v1.4 runs
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="-.", label=f"published (up3.0, last step): {ref}")
    ax.set_ylabel(f"{metric} ({split} split,\nmean over images)")
    what = f"best {len(top)} layers highlighted" if top else "all layers"
    ax.set_title(f"{task}: {metric} vs denoising step: {what}{title_suffix}",
                 fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if ax2 is not None:
        ax2.plot([p[0] for p in decoded], [p[1] for p in decoded], "-", lw=2.5, marker="s", ms=4, color="black",
                 label=describe(decoded_layer))
        if top:
            pts = curve[top[0]]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1.2, color=highlight_colours(0),
                     label=f"probe {top[0]} (from above)")
        ax2.set_ylabel(f"{metric}\n(own scale)")
        latent = {"noisy": "the noisy latent x_{t-1}", "x0": "the predicted x0"}[latent_of(decoded_layer)]
        ax2.set_title(f"baseline: the task's labeler run on the image decoded from {latent} at each step",
                      fontsize=8, loc="left")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _step_axis(ax2 if ax2 is not None else ax, steps, [ts[s] for s in steps])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _has_val(rows: list[dict], task: str, metric: str) -> bool:
    return any(r["split"] == "val" and r["task"] == task and r["metric"] == metric for r in rows)


def fixed_margins(fig: Any, left: float, right: float, bottom: float, top: float) -> None:
    """Margins in inches (``subplots_adjust`` takes fractions of the figure)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=min(left / w, 0.45), right=max(1 - right / w, 0.55), bottom=min(bottom / h, 0.45),
                        top=max(1 - top / h, 0.55))


def plot_heatmap(rows: list[dict], split: str, task: str, metric: str, path: Path, title_suffix: str = "",
                 column: str = "value") -> Path:
    """Layer x step heatmap of the probes' ``column``: ``value`` (the score) or ``gain`` (the activation+prior
    head's score minus the prior map's: what the activations add to position; centred at 0)."""
    # probes only: the decoded-image baseline is in the line plot, and would dominate the colour scale
    sel = [r for r in _select(rows, split=split, task=task, metric=metric) if r["layer"] not in NOT_PROBES
           and column in r]
    layers = list(dict.fromkeys(r["layer"] for r in sel))
    steps = sorted({r["step"] for r in sel})
    ts = {r["step"]: r["timestep"] for r in sel}
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in sel:
        grid[layers.index(r["layer"]), steps.index(r["step"])] = r[column]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(steps), 1.2 + 0.36 * len(layers)))
    if column == "gain":
        lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        cmap = "RdBu" if metric in LOWER_IS_BETTER else "RdBu_r"
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-lim or -1, vmax=lim or 1)
    else:
        cmap = "viridis_r" if metric in LOWER_IS_BETTER else "viridis"
        im = ax.imshow(grid, aspect="auto", cmap=cmap)
    for i in range(len(layers)):
        for j in range(len(steps)):
            if np.isfinite(grid[i, j]):
                shade = float(im.norm(grid[i, j]))          # white on the map's dark end(s): both ends of a diverging one
                dark = abs(shade - 0.5) > 0.3 if column == "gain" else shade < 0.5
                ax.text(j, i, fmt_value(grid[i, j], 2), ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=8)
    ax.set_ylabel("layer (forward order)")
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([f"{s}\n{tick_timestep(ts[s])}" for s in steps], fontsize=7)
    ax.set_xlabel("denoising step (top) / scheduler timestep t (bottom)")
    what = f"gain over position in {metric} (activations + prior map − prior map)" if column == "gain" else metric
    ax.set_title(f"{task}: {what} ({split}), layer x step{title_suffix}", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, label=f"gain in {metric}" if column == "gain" else metric, fraction=0.04, pad=0.02)
    # margins from the label lengths, not tight_layout: its extra draw pass was 40 % of the figure's cost,
    # and a run writes a heatmap per task, metric and column
    fixed_margins(fig, left=0.55 + 0.065 * max((len(name) for name in layers), default=4), right=0.75,
                  bottom=0.75, top=0.4)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def emergence_curves(rows: list[dict], task: str, split: str = "test") -> dict[str, Any]:
    """The curves of a task's emergence figure that exist, each ``[(step, timestep, value)]``:

    - ``probe``: the task's primary metric of the head it is reported by (the best layer picked on
      validation; without a validation split the pre-declared reference layer, never a pick on
      test), with ``probe_label`` saying which;
    - ``labeler``: the task's labeler on the decoded images, same metric (``labeler_layer``);
    - ``classifier prob`` / ``classifier top-1``: the classifier on the same images
      (task-independent; ``classifier_layer``).
    """
    metric = get_task(task).primary
    out: dict[str, Any] = {}
    try:
        head = [b for b in reported_heads(rows) if b["task"] == task and b["metric"] == metric]
    except ValueError:        # unrankable (non-finite) scores: no probe curve rather than no report
        head = []
    if head:
        how = "picked on val" if head[0].get("selected_on") == "val" else str(head[0].get("selected_on"))
        out["probe"] = _curve(rows, split, task, metric, head[0]["layer"])
        out["probe_label"] = f"probe, layer {head[0]['layer']} ({how})"
    gain_head = [b for b in best_heads(rows, column="with_prior") if b["task"] == task and b["metric"] == metric]
    if gain_head:
        sel = sorted((r["step"], r["timestep"], r["with_prior"]) for r in rows if r["split"] == split
                     and r["task"] == task and r["metric"] == metric and r["layer"] == gain_head[0]["layer"]
                     and "with_prior" in r)
        out["with_prior"] = sel
        out["with_prior_label"] = f"activations + prior map, layer {gain_head[0]['layer']} (picked on val)"
    out["prior"] = _curve(rows, split, task, metric, PRIOR)
    decoded = next((r["layer"] for r in rows if r["task"] == task and r["split"] == split and is_decoded(r["layer"])), None)
    if decoded:
        out["labeler"], out["labeler_layer"] = _curve(rows, split, task, metric, decoded), decoded
    clf = next((r["layer"] for r in rows if r["task"] == CLASSIFICATION and r["split"] == split), None)
    if clf:
        out["classifier prob"] = _curve(rows, split, CLASSIFICATION, "prob", clf)
        out["classifier top-1"] = _curve(rows, split, CLASSIFICATION, "top1", clf)
        out["classifier_layer"] = clf
    return {k: v for k, v in out.items() if v}


def plot_emergence(rows: list[dict], task: str, path: Path, split: str = "test", title_suffix: str = "") -> Path | None:
    """One figure per task: when does each reader find it? None when there is no probe curve or
    nothing to set beside it.

    The replication's argument in one picture: the probe's score per step, the off-the-shelf
    labeler on the image decoded at each step (same metric, left axis), and the classifier's
    probability of the prompt's class and its top-1 accuracy on those images (right axis, 0..1).
    """
    c = emergence_curves(rows, task, split)
    if "probe" not in c or not ({"labeler", "classifier prob"} & set(c)):
        return None
    metric = get_task(task).primary
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = [c[k] for k in ("probe", "with_prior", "prior", "labeler", "classifier prob", "classifier top-1") if k in c]
    ts = {s: t for curve in drawn for s, t, _ in curve}
    steps = sorted(ts)

    def line(axis, key, style, **kw):
        axis.plot([p[0] for p in c[key]], [p[2] for p in c[key]], style, **kw)

    line(ax, "probe", "-o", lw=2.4, ms=4, color="tab:blue", label=c["probe_label"])
    if "with_prior" in c:
        line(ax, "with_prior", "-d", lw=1.8, ms=4, color="tab:green", label=c["with_prior_label"])
    if "prior" in c:
        line(ax, "prior", "--", lw=1.6, color="grey", label=describe(PRIOR))
    if "labeler" in c:
        line(ax, "labeler", "-s", lw=2.2, ms=4, color="black", label=describe(c["labeler_layer"]))
    ax.set_ylabel(f"{metric} ({split} split)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "classifier prob" in c:
        who = describe(c["classifier_layer"])
        right = ax.twinx()
        line(right, "classifier prob", "--", lw=2, color="tab:red", label=f"{who}: probability of the prompt's class")
        line(right, "classifier top-1", ":^", lw=2, ms=4, color="tab:red", label=f"{who}: top-1 accuracy")
        right.set_ylim(0, 1.02)
        right.set_ylabel("classifier (right axis)", color="tab:red")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax.set_title(f"{task}: when does each reader find it? probe vs labeler vs classifier{title_suffix}",
                 fontsize=10, loc="left")
    _step_axis(ax, steps, [ts[s] for s in steps])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows: list[dict], out_dir: Path, split: str = "test", title_suffix: str = "",
             published: bool = False) -> list[Path]:
    """Both plots for every (task, metric) in ``split`` that has probes (the loss is left out), then
    each task's emergence figure (probe vs labeler on decoded images vs classifier). ``published``:
    draw the SD v1.4 paper's numbers (a run of SD v1.4's weights; on any other model they compare
    nothing)."""
    paths = []
    pairs = list(dict.fromkeys((r["task"], r["metric"]) for r in rows if r["split"] == split
                               and r["metric"] not in NOT_SCORES and r["layer"] not in NOT_PROBES))
    for task, metric in pairs:
        paths.append(plot_metric_vs_step(rows, split, task, metric, out_dir / f"{split}_{task}_{metric}_vs_step.png",
                                         title_suffix, published=published))
        paths.append(plot_heatmap(rows, split, task, metric, out_dir / f"{split}_{task}_{metric}_heatmap.png", title_suffix))
        if any("gain" in r for r in _select(rows, split=split, task=task, metric=metric)):
            paths.append(plot_heatmap(rows, split, task, metric, out_dir / f"{split}_{task}_{metric}_gain_heatmap.png",
                                      title_suffix, column="gain"))
    for task in dict.fromkeys(t for t, _ in pairs):
        figure = plot_emergence(rows, task, out_dir / f"emergence_{task}.png", split, title_suffix)
        if figure is not None:
            paths.append(figure)
    return paths
