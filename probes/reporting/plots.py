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

from probes.reporting.tables import NOT_PROBES, NOT_SCORES  # noqa: E402
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
    ax.set_xticklabels([f"{s}\n{t:.0f}" for s, t in zip(steps, timesteps)], fontsize=7)
    ax.set_xlabel("denoising step (top) / scheduler timestep t (bottom)")


def plot_metric_vs_step(rows: list[dict], split: str, task: str, metric: str, path: Path,
                        title_suffix: str = "") -> Path:
    sel = _select(rows, split=split, task=task, metric=metric)
    layers = list(dict.fromkeys(r["layer"] for r in sel))
    colours = layer_colours(layers)
    fig, ax = plt.subplots(figsize=(9, 5))
    steps = sorted({r["step"] for r in sel})
    ts = {r["step"]: r["timestep"] for r in sel}
    for layer in layers:
        pts = sorted((r["step"], r["value"]) for r in sel if r["layer"] == layer)
        if layer == "decoded_x0":  # the labeler on decoded intermediate images: the probes' baseline
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=2.5, marker="s", ms=4, color="black",
                    label="labeler on decoded x0 image")
            continue
        style = "-" if layer.startswith("up") else "--" if layer.startswith("down") else ":"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, color=colours[layer], label=layer)
    ref = PUBLISHED.get((task, metric))
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="-.", label=f"published (up3.0, last step): {ref}")
    _step_axis(ax, steps, [ts[s] for s in steps])
    ax.set_ylabel(f"{metric} ({split} split, mean over images)")
    ax.set_title(f"{task}: {metric} vs denoising step, one line per layer{title_suffix}", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if im.norm(grid[i, j]) < 0.5 else "black")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=8)
    ax.set_ylabel("layer (forward order)")
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([f"{s}\n{ts[s]:.0f}" for s in steps], fontsize=7)
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
