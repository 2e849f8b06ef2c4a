"""Results as data: ``metrics.csv`` in long form, the best (layer, step) per task, a text table.

Long form (one row per split, task, layer, step, metric) is what pandas, W&B tables and
spreadsheets all read without reshaping. Best heads are picked on the validation split and
their test value is reported, so the test set is never used for selection: without a validation
split (the reference-exact runs train on all 246 images) nothing is picked, the report says so,
and its curves show all layers or the pre-declared layer ``REFERENCE_LAYER``.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

from probes.common.csv_rows import write_csv
from probes.metrics.baseline_rows import NOT_PROBES as PSEUDO_LAYERS
from probes.reporting.markup import fmt_timestep, fmt_value
from probes.tasks import better

COLUMNS = ["split", "task", "layer", "step", "timestep", "metric", "value", "with_prior", "gain"]
#: the columns read as numbers when present (``with_prior``, ``gain``: empty where a row has none)
OPTIONAL_NUMBERS = ("with_prior", "gain")
#: rows of metrics.csv that are not scores (no best head is picked on them)
NOT_SCORES = {"loss", "ridge_lambda"}
#: pseudo-layers that are not probes (labeler / classifier on decoded intermediate images, position)
NOT_PROBES = set(PSEUDO_LAYERS)
#: the only split anything is selected on
SELECT_SPLIT = "val"
#: the published comparison point's layer (up_blocks.3.attentions.0): declared before any result,
#: so a curve of it selects nothing
REFERENCE_LAYER = "up3.0"
NO_SELECTION = "no validation split: no layer is selected; all layers shown"
REAL_COMMAND = "python train.py fit --config configs/sd14/all.yaml"
RANDOM_WARNING = (
    "NOTE: this model has RANDOM WEIGHTS. Its images are noise and every number here is meaningless by "
    "design: the run only shows that the pipeline works end to end.\n"
    f"      The real experiment (SD v1.4 weights, GPU): {REAL_COMMAND}")


def write_metrics_csv(rows: Iterable[dict], path: Path) -> Path:
    return write_csv(rows, COLUMNS, path)


def read_metrics_csv(path: Path) -> list[dict]:
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {**r, "step": int(r["step"]), "timestep": float(r["timestep"]), "value": float(r["value"])}
            for c in OPTIONAL_NUMBERS:
                if row.get(c) in (None, ""):
                    row.pop(c, None)
                else:
                    row[c] = float(row[c])
            out.append(row)
    return out


def can_select(rows: list[dict]) -> bool:
    """Whether ``rows`` hold validation scores, the only ones anything may be selected on."""
    return any(r["split"] == SELECT_SPLIT for r in rows)


def best_heads(rows: list[dict], select_split: str = SELECT_SPLIT, column: str = "value") -> list[dict]:
    """Per (task, metric): the (layer, step) best on ``select_split`` and its value on every split.

    Empty when ``rows`` have no ``select_split`` scores (a run without validation split): nothing
    is picked rather than picking on test. Selecting on ``test`` is refused outright.
    ``column="with_prior"`` picks among the activation+prior heads (the gain's heads) instead.
    """
    if select_split == "test":
        raise ValueError("best_heads: selecting on the test split is refused (its scores would be biased upwards); "
                         "select on 'val'")
    index = {(r["split"], r["task"], r["metric"], r["layer"], r["step"]): r for r in rows}
    splits = list(dict.fromkeys(r["split"] for r in rows))
    if select_split not in splits:
        return []
    out = []
    # a NaN never wins a comparison, so dropping it would quietly crown another head; it means corrupt
    # data or diverged probes, and the run's numbers cannot be ranked
    bad = [r for r in rows if r["metric"] not in NOT_SCORES and r["layer"] not in NOT_PROBES
           and not math.isfinite(float(r["value"]))]
    if bad:
        shown = ", ".join(f"{r['split']} {r['task']}/{r['metric']} layer {r['layer']} step {r['step']}" for r in bad[:3])
        raise ValueError(f"{len(bad)} metric value(s) are not finite ({shown}{', ...' if len(bad) > 3 else ''}): "
                         f"no best head can be picked. They come from non-finite activations or labels, or diverged "
                         f"probes; rerun (training stops on them, naming the file and the sample).")
    for task, metric in dict.fromkeys((r["task"], r["metric"]) for r in rows if r["metric"] not in NOT_SCORES):
        cands = [r for r in rows if r["split"] == select_split and r["task"] == task and r["metric"] == metric
                 and r["layer"] not in NOT_PROBES and column in r]
        if not cands:
            continue
        best = cands[0]
        for r in cands[1:]:
            if better(metric, r[column], best[column]):
                best = r
        entry = {"task": task, "metric": metric, "layer": best["layer"], "step": best["step"],
                 "timestep": best["timestep"], "selected_on": select_split}
        for s in splits:
            hit = index.get((s, task, metric, best["layer"], best["step"]))
            entry[s] = hit.get(column, float("nan")) if hit else float("nan")
        out.append(entry)
    return out


def reference_heads(rows: list[dict], layer: str = "up3.0") -> list[dict]:
    """The published comparison point: layer ``up3.0`` at the last step, per task and metric."""
    out = []
    last = max((r["step"] for r in rows), default=None)
    for task, metric in dict.fromkeys((r["task"], r["metric"]) for r in rows if r["metric"] not in NOT_SCORES):
        vals = {r["split"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric
                and r["layer"] == layer and r["step"] == last}
        if vals:
            out.append({"task": task, "metric": metric, "layer": layer, "step": last, **vals})
    return out


def reported_heads(rows: list[dict]) -> list[dict]:
    """The head each (task, metric) is reported by: the best on val, or, without a validation split,
    the pre-declared ``REFERENCE_LAYER`` at the last step (nothing selected; ``selected_on`` says so)."""
    if can_select(rows):
        return best_heads(rows)
    return [dict(h, selected_on="none (pre-declared)") for h in reference_heads(rows, REFERENCE_LAYER)]


def format_table(rows: list[dict], is_random: bool) -> str:
    """The table printed at the end of a run."""
    lines = []
    best = best_heads(rows)
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    head = f"{'task':<11}{'metric':<10}{'best layer':<12}{'step':>5}{'t':>8}" + "".join(f"{s:>9}" for s in splits)
    if can_select(rows):
        lines += ["", "Best (layer, step) per task and metric, selected on the validation split:", head, "-" * len(head)]
    else:
        lines += ["", f"Best (layer, step): none picked ({NO_SELECTION}; the test split is never used to select)."]
    for b in best:
        lines.append(f"{b['task']:<11}{b['metric']:<10}{b['layer']:<12}{b['step']:>5}{fmt_timestep(b['timestep']):>8}"
                     + "".join(f"{fmt_value(b.get(s, float('nan'))):>9}" for s in splits))
    ref = reference_heads(rows)
    if ref:
        lines += ["", f"Published comparison point (layer up3.0, last step {ref[0]['step']}):"]
        for r in ref:
            lines.append(f"{r['task']:<11}{r['metric']:<10}" + "".join(f"{s}={fmt_value(r.get(s, float('nan')))}  " for s in splits))
    if is_random:
        lines += ["", RANDOM_WARNING]
    return "\n".join(lines)


def _curve(rows: list[dict], split: str, task: str, metric: str, layer: str | None) -> list[tuple[int, float, float]]:
    """(step, timestep, value) on ``split`` of one layer, or (``layer=None``) at each step of the layer
    best on the *validation* split at that step; empty without validation scores (never picked on test)."""
    sel = [r for r in rows if r["split"] == split and r["task"] == task and r["metric"] == metric]
    if layer is not None:
        sel = [r for r in sel if r["layer"] == layer]
        return sorted((r["step"], r["timestep"], r["value"]) for r in sel)
    value = {(r["layer"], r["step"]): r for r in sel if r["layer"] not in NOT_PROBES}
    val = [r for r in rows if r["split"] == SELECT_SPLIT and r["task"] == task and r["metric"] == metric
           and r["layer"] not in NOT_PROBES and (r["layer"], r["step"]) in value]
    out = []
    for step in sorted({r["step"] for r in val}):
        at = [r for r in val if r["step"] == step]
        pick = at[0]
        for r in at[1:]:
            if better(metric, r["value"], pick["value"]):
                pick = r
        hit = value[(pick["layer"], step)]
        out.append((step, hit["timestep"], hit["value"]))
    return out


def emergence_step(curve: list[tuple[int, float, float]], fraction: float = 0.9,
                   lower_is_better: bool = False) -> dict | None:
    """When a curve's signal appears: the first step whose score reaches ``fraction`` of the final one.

    That definition assumes the score builds up towards the last step. Two other shapes get an
    explicit answer instead of a misleading step (a curve falling from 0.43 to 0.17 would
    otherwise "emerge" at step 0, since every step beats 90 % of 0.17):

    - **declines**: the final score is below ``fraction`` of the curve's peak. ``step`` is
      ``None``; ``peak_step`` / ``peak`` say where the signal was highest.
    - **no signal**: the final score is not positive (higher-is-better scores only). ``step`` is
      ``None``.

    ``note`` says which case applies, in words for the report. For lower-is-better metrics the
    score must come within ``1/fraction`` of the final value (and "declines" means it ends worse
    than ``1/fraction`` of its best).
    """
    if not curve:
        return None
    final = curve[-1][2]
    best = min(curve, key=lambda c: c[2]) if lower_is_better else max(curve, key=lambda c: c[2])
    out = {"step": None, "timestep": None, "value": None, "final": final, "peak_step": best[0], "peak": best[2]}
    if final != final:
        return dict(out, note="no score at the last step")
    if not lower_is_better and final <= 0:
        return dict(out, note=f"never emerges: final score {fmt_value(final)} <= 0")
    declines = final > best[2] / fraction if lower_is_better else final < fraction * best[2]
    if declines:
        return dict(out, note=f"never emerges: peaks at step {best[0]} ({fmt_value(best[2])}), "
                              f"declines to {fmt_value(final)}")
    for step, t, v in curve:
        ok = v <= final / fraction if lower_is_better else v >= fraction * final
        if ok:
            return dict(out, step=step, timestep=t, value=v, note=f"step {step}")
    return None
