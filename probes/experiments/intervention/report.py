"""The intervention's report: a one-line verdict, a Markdown and an HTML summary, one PNG grid per condition.

Why a grid per condition: the causal claim is visual first (does the object sit where the target
says?), so each row shows one test image as original | its label | target | edited | re-labelled,
for the edit and for each control, next to the numbers that summarise all of them.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probes.common.files import atomic_write_text, save_figure  # noqa: E402
from probes.reporting.markup import embed_png, fmt_value, html_page, table  # noqa: E402

#: metrics shown in the report's table, per task kind, in this order (all are in metrics.csv)
HEADLINE = {"binary": ("success_rate", "progress", "displacement", "dice_target", "dice_requested", "dice_original",
                       "empty", "probe_loss_before", "probe_loss_after", "pixel_mae", "pixel_max", "pixel_max_worst",
                       "pixel_psnr", "colour_shift", "same_class", "activation_shift"),
            "regression": ("success_rate", "spearman_target", "spearman_requested", "spearman_original",
                           "probe_loss_before", "probe_loss_after", "pixel_mae", "pixel_max", "pixel_max_worst",
                           "pixel_psnr", "same_class", "activation_shift")}
#: shown as "n/a" when no condition has them (no classifier for these images), instead of left out
ALWAYS_SHOWN = ("same_class",)
#: the modes table (``mode: both``): one row per mode, these (condition, metric) columns
MODE_COLUMNS = (("edit", "success_rate"), ("random", "success_rate"), ("noop", "pixel_mae"), ("noop", "pixel_psnr"),
                ("noop", "colour_shift"), ("edit", "colour_shift"), ("edit", "same_class"),
                ("edit", "probe_loss_before"), ("edit", "probe_loss_after"), ("edit", "activation_shift"))


@dataclass
class ConditionResult:
    """One condition of one image: its target (probe units), edited image and re-labelled map."""

    target: np.ndarray
    image: np.ndarray
    relabel: np.ndarray           # probe units, like the target
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    index: int
    prompt: str
    seed: int
    shift: tuple[int, int]
    original: np.ndarray
    label: np.ndarray             # probe units
    conditions: dict[str, ConditionResult] = field(default_factory=dict)


def _show(ax, x: np.ndarray, kind: str, title: str) -> None:
    """Masks in black and white; depth maps each stretched to their own range (scores are rank-based)."""
    if x.ndim == 3:
        ax.imshow(x)
    elif kind == "binary":
        ax.imshow(x, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(x, cmap="viridis")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def write_grid(results: Sequence[ImageResult], condition: str, kind: str, path: Path) -> Path:
    """Rows: images; columns: original | its label | target | edited | re-labelled (the condition's)."""
    rows = [r for r in results if condition in r.conditions]
    if not rows:
        raise ValueError(f"no image has results for condition {condition!r}")
    fig, axes = plt.subplots(len(rows), 5, figsize=(10, 2.1 * len(rows)), squeeze=False)
    for row, r in zip(axes, rows):
        c = r.conditions[condition]
        move = f" (shift {r.shift[0]:+d}, {r.shift[1]:+d} px)" if condition.split("/")[-1] == "edit" else ""
        _show(row[0], r.original, kind, f"#{r.index} original")
        _show(row[1], r.label, kind, "original label")
        _show(row[2], c.target, kind, f"{condition} target{move}")
        success = c.scores.get("success", math.nan)
        verdict = "" if math.isnan(success) else (" - moved" if success else " - not moved")
        _show(row[3], c.image, kind, f"edited{verdict}")
        _show(row[4], c.relabel, kind, "re-labelled")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def verdict(summary: Sequence[dict], kind: str) -> str:
    """The run in one line: how often the edit moved the object (or, for depth, ranked closer to the
    moved target) against the random control, and the no-op's pixel change (its side effect)."""
    value = {(r["condition"], r["metric"]): r["value"] for r in summary}
    verb = "moved" if kind == "binary" else "followed the target"
    parts = []
    if ("edit", "success_rate") in value:
        part = f"{verb} {_pct(value[('edit', 'success_rate')])}"
        if ("random", "success_rate") in value:
            part += f" vs {_pct(value[('random', 'success_rate')])} random"
        parts.append(part)
    if ("noop", "pixel_mae") in value:
        parts.append(f"no-op MAE {fmt_value(value[('noop', 'pixel_mae')])} (0-255)")
    n = max((int(v) for (_, m), v in value.items() if m == "n_images"), default=0)
    return f"Intervention: {', '.join(parts) or 'no condition scored'} ({n} images)"


def split_modes(summary: Sequence[dict]) -> dict[str, list[dict]]:
    """Summary rows per edit mode, conditions without their ``mode/`` prefix (``""``: a one-mode run)."""
    out: dict[str, list[dict]] = {}
    for r in summary:
        mode, _, condition = str(r["condition"]).rpartition("/")
        out.setdefault(mode, []).append({**r, "condition": condition})
    return out


def mode_verdicts(summary: Sequence[dict], kind: str) -> list[str]:
    """:func:`verdict` per edit mode (one line for a one-mode run, as before)."""
    return [verdict(rows, kind) if not mode else f"[{mode}] {verdict(rows, kind)}"
            for mode, rows in split_modes(summary).items()]


def _modes_table(summary: Sequence[dict]) -> tuple[str, str] | None:
    """One row per edit mode with the bar's numbers side by side (None for a one-mode run)."""
    per_mode = split_modes(summary)
    if len(per_mode) < 2:
        return None
    rows = []
    for mode, rs in per_mode.items():
        value = {(r["condition"], r["metric"]): r["value"] for r in rs}
        rows.append([mode, *[fmt_value(value[key]) if key in value else "n/a" for key in MODE_COLUMNS]])
    return table(["mode", *[f"{c} {m}" for c, m in MODE_COLUMNS]], rows)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f} %"


def _definitions(kind: str) -> list[str]:
    if kind == "binary":
        success = ("success: the re-labelled foreground's centroid moved at least half the requested distance in "
                   "the requested direction (projection of its displacement on the requested shift >= 0.5 x |shift|); "
                   "controls are scored against the edit's requested shift. progress: that projection / |shift|.")
    else:
        success = ("success: the re-labelled depth ranks closer to the requested (shifted) target than to the "
                   "original label (Spearman).")
    return [success, "pixel_mae / pixel_max: absolute difference to the unedited image (0-255); the no-op's is the "
                     "edit's side effect. pixel_psnr: its PSNR in dB. colour_shift: CIELAB ΔE (CIE76) between the "
                     "object's mean colour before and after (each under its own mask; 2.3 is just noticeable). "
                     "same_class: share of images whose shapes the toy classifier still names alike (n/a: no "
                     "classifier for these images). probe_loss_before / after: the probes' loss on the edited "
                     "activations before and after the edit (latent mode: on the step's activations before and "
                     "after guidance). activation_shift: mean Mahalanobis distance of the edited tokens over the "
                     "same tokens' before the edit, under the store's token mean and covariance at that step and "
                     "layer (1: the edit stays as typical as the model's own activations; activation mode only)."]


def _results_table(summary: Sequence[dict], kind: str) -> tuple[str, str]:
    conditions = list(dict.fromkeys(r["condition"] for r in summary))
    value = {(r["condition"], r["metric"]): r["value"] for r in summary}
    metrics = [m for m in HEADLINE[kind] if m in ALWAYS_SHOWN or any((c, m) in value for c in conditions)]
    n = {c: int(value.get((c, "n_images"), 0)) for c in conditions}
    return table(["metric", *[f"{c} (n={n[c]})" for c in conditions]],
                 [[m, *[fmt_value(value[(c, m)]) if (c, m) in value else "n/a" for c in conditions]] for m in metrics])


def write_markdown(path: Path, summary: Sequence[dict], kind: str, settings: dict, grids: dict[str, Path],
                   video: dict[str, Path] | None, notes: Sequence[str] = ()) -> Path:
    """``report.md``: the verdict, settings, the per-condition table, the grids and the video."""
    results, _ = _results_table(summary, kind)
    lines = [f"# Intervention: {settings.get('task')}", ""]
    lines += [f"**{v}**\n" for v in mode_verdicts(summary, kind)]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    modes = _modes_table(summary)
    if modes:
        lines += ["", "## Edit modes (test split)", "", modes[0]]
    lines += ["", "## Results (test split)", "", results, ""]
    d = _definitions(kind)
    lines += [d[0], d[1], *notes, ""]
    for c, g in grids.items():
        lines += [f"## {c}", "", f"![{c}]({g.name})", ""]
    if video:
        lines += ["## Video", "", f"![video]({video['gif'].name}) ([mp4]({video['mp4'].name}))", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


#: what each condition's grid shows, as its caption says it
GRID_CAPTIONS = {"edit": "edit: the probes' target moved by the requested shift",
                 "noop": "no-op: the target is the original label (the edit's side effect alone)",
                 "random": "random control: another image's label (or an independent shift) as the target"}


def write_html(path: Path, summary: Sequence[dict], kind: str, settings: dict, grids: dict[str, Path],
               video: dict[str, Path] | None, notes: Sequence[str] = ()) -> Path:
    """``report.html``: :func:`write_markdown`'s content in one self-contained file (grids embedded)."""
    _, results = _results_table(summary, kind)
    _, setting_rows = table(["setting", "value"], [[k, str(v)] for k, v in settings.items()])
    parts = [f"<h1>Intervention: {html.escape(str(settings.get('task')))}</h1>"]
    parts += [f"<p><b>{html.escape(v)}</b></p>" for v in mode_verdicts(summary, kind)]
    modes = _modes_table(summary)
    if modes:
        parts += ["<h2>Edit modes (test split)</h2>", modes[1]]
    parts += [f"<p style='background:#fee;padding:6px'><b>{html.escape(n)}</b></p>" for n in notes if n.strip()]
    parts += ["<h2>Results (test split)</h2>", results, *[f"<p>{html.escape(d)}</p>" for d in _definitions(kind)]]
    parts.append("<h2>Grids: original | its label | target | edited | re-labelled</h2>")
    parts += [embed_png(g, f"{c.rpartition('/')[0]}: " * ("/" in c) + GRID_CAPTIONS.get(c.split("/")[-1], c))
              for c, g in grids.items()]
    if video:
        parts += ["<h2>Video</h2>", f"<p><a href='{html.escape(video['gif'].name)}'>GIF</a> | "
                                    f"<a href='{html.escape(video['mp4'].name)}'>MP4</a></p>"]
    parts += ["<h2>Settings</h2>", setting_rows]
    atomic_write_text(path, html_page(f"Intervention: {settings.get('task')}", parts))
    return path
