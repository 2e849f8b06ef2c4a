"""Plots people look at instead of reading tables: metric vs step, and layer x step heatmaps.

Colours are fixed per layer (by its position in forward order, the same in every plot and
run), the x axis shows the step index with the scheduler timestep beneath it, and every axis
is labelled. Input is the long-form rows of ``metrics.csv``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probes.reporting.tables import NOT_PROBES, NOT_SCORES, fmt_value, tick_timestep  # noqa: E402
from probes.tasks import LOWER_IS_BETTER  # noqa: E402

#: reference points (replication, last step, up3.0) drawn as a dashed line where they apply
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


#: how non-probe rows are drawn and named (``decoded_x0`` gets a panel of its own, see below)
BASELINE_NAMES = {"decoded_x0": "labeler on decoded x0 image", "position": "pixel position only (baseline)"}
HIGHLIGHT = 3


def rank_layers(rows: list[dict], task: str, metric: str, split: str) -> list[str]:
    """Probe layers, best first, by their peak score over steps on the validation split (the split
    every selection uses; ``split`` when there is no val), so the highlighted layers of a test plot
    are not picked on test."""
    pick = "val" if any(r["split"] == "val" and r["task"] == task and r["metric"] == metric for r in rows) else split
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
                        title_suffix: str = "", highlight: int = HIGHLIGHT) -> Path:
    """Metric vs step: the ``highlight`` best layers in colour, the others thin and grey.

    Sixteen coloured lines cannot be told apart, and the question is usually "which layers, from
    which step": so the best few (peak on val) are drawn in distinct colours and the rest as grey
    context. The labeler on decoded x0 images lives on another scale (it starts near 0 and ends
    near 1), so it gets a panel of its own below, with the best layer repeated there for
    comparison; it would otherwise squash the probe lines into a band.
    """
    sel = _select(rows, split=split, task=task, metric=metric)
    probes = [l for l in dict.fromkeys(r["layer"] for r in sel) if l not in NOT_PROBES]
    ranked = [l for l in rank_layers(rows, task, metric, split) if l in probes]
    top = ranked[:highlight]
    decoded = sorted((r["step"], r["value"]) for r in sel if r["layer"] == "decoded_x0")
    steps = sorted({r["step"] for r in sel})
    ts = {r["step"]: r["timestep"] for r in sel}
    if decoded:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.6), sharex=True, gridspec_kw={"height_ratios": [2.4, 1]})
    else:
        fig, ax = plt.subplots(figsize=(9, 5))
        ax2 = None
    curve = {l: sorted((r["step"], r["value"]) for r in sel if r["layer"] == l) for l in probes}
    others = [l for l in probes if l not in top]
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
        if layer in NOT_PROBES and layer != "decoded_x0":
            pts = sorted((r["step"], r["value"]) for r in sel if r["layer"] == layer)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1.6, color="black", zorder=2,
                    label=BASELINE_NAMES.get(layer, layer))
    ref = PUBLISHED.get((task, metric))
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="-.", label=f"published (up3.0, last step): {ref}")
    ax.set_ylabel(f"{metric} ({split} split,\nmean over images)")
    ax.set_title(f"{task}: {metric} vs denoising step: best {len(top)} layers highlighted{title_suffix}",
                 fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if ax2 is not None:
        ax2.plot([p[0] for p in decoded], [p[1] for p in decoded], "-", lw=2.5, marker="s", ms=4, color="black",
                 label=BASELINE_NAMES["decoded_x0"])
        if top:
            pts = curve[top[0]]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1.2, color=highlight_colours(0),
                     label=f"probe {top[0]} (from above)")
        ax2.set_ylabel(f"{metric}\n(own scale)")
        ax2.set_title("baseline: the task's labeler run on the image decoded from the predicted x0 at each step",
                      fontsize=8, loc="left")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _step_axis(ax2 if ax2 is not None else ax, steps, [ts[s] for s in steps])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has_val(rows: list[dict], task: str, metric: str) -> bool:
    return any(r["split"] == "val" and r["task"] == task and r["metric"] == metric for r in rows)


def plot_heatmap(rows: list[dict], split: str, task: str, metric: str, path: Path, title_suffix: str = "") -> Path:
    # probes only: the decoded-x0 baseline is in the line plot, and would dominate the colour scale
    sel = [r for r in _select(rows, split=split, task=task, metric=metric) if r["layer"] not in NOT_PROBES]
    layers = list(dict.fromkeys(r["layer"] for r in sel))
    steps = sorted({r["step"] for r in sel})
    ts = {r["step"]: r["timestep"] for r in sel}
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in sel:
        grid[layers.index(r["layer"]), steps.index(r["step"])] = r["value"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(steps), 1.2 + 0.36 * len(layers)))
    cmap = "viridis_r" if metric in LOWER_IS_BETTER else "viridis"
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    for i in range(len(layers)):
        for j in range(len(steps)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, fmt_value(grid[i, j], 2), ha="center", va="center", fontsize=6,
                        color="white" if im.norm(grid[i, j]) < 0.5 else "black")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=8)
    ax.set_ylabel("layer (forward order)")
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([f"{s}\n{tick_timestep(ts[s])}" for s in steps], fontsize=7)
    ax.set_xlabel("denoising step (top) / scheduler timestep t (bottom)")
    ax.set_title(f"{task}: {metric} ({split}), layer x step{title_suffix}", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows: list[dict], out_dir: Path, split: str = "test", title_suffix: str = "") -> list[Path]:
    """Both plots for every (task, metric) in ``split`` (the loss is left out)."""
    paths = []
    pairs = list(dict.fromkeys((r["task"], r["metric"]) for r in rows if r["split"] == split and r["metric"] not in NOT_SCORES))
    for task, metric in pairs:
        paths.append(plot_metric_vs_step(rows, split, task, metric, out_dir / f"{split}_{task}_{metric}_vs_step.png", title_suffix))
        paths.append(plot_heatmap(rows, split, task, metric, out_dir / f"{split}_{task}_{metric}_heatmap.png", title_suffix))
    return paths
