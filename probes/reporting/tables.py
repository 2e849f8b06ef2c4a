"""Results as data: ``metrics.csv`` in long form, the best (layer, step) per task, a text table.

Long form (one row per split, task, layer, step, metric) is what pandas, W&B tables and
spreadsheets all read without reshaping. Best heads are picked on the validation split and
their test value is reported, so the test set is never used for selection: without a validation
split (the reference-exact runs train on all 246 images) nothing is picked, the report says so,
and its curves show all layers or the pre-declared layer ``REFERENCE_LAYER``.
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from probes.common.csv_rows import write_csv
from probes.common.files import read_json_object
from probes.metrics.baseline_rows import NOT_PROBES as PSEUDO_LAYERS
from probes.reporting.markup import fmt_timestep, fmt_value
from probes.tasks import better

COLUMNS = ["split", "task", "layer", "step", "timestep", "metric", "value", "with_prior", "gain"]
#: the columns every row fills (files written before ``with_prior`` / ``gain`` have only these)
BASE_COLUMNS = COLUMNS[:7]
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


#: the file beside ``metrics.csv`` that records it (rows and sha256): written after it, by the same run
SUMMARY = "summary.json"
RERUN = "rerun the run (or `python evaluate.py --probes <run>/probes`) to write it again"


def write_metrics_csv(rows: Iterable[dict], path: Path) -> Path:
    return write_csv(rows, COLUMNS, path)


def metrics_record(path: Path) -> dict[str, Any]:
    """What ``summary.json`` records of a just-written ``metrics.csv``: its row count and sha256, so a
    later reader tells a complete file from one cut short, half-written or edited."""
    data = Path(path).read_bytes()
    return {"rows": max(0, data.count(b"\n") - 1), "sha256": hashlib.sha256(data).hexdigest()}


def read_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json``; a truncated or foreign one is named with the fix."""
    return read_json_object(path, "a run summary", RERUN)


def read_metrics_csv(path: Path, record: dict[str, Any] | None = None) -> list[dict]:
    """The rows of a ``metrics.csv``, refused (naming the file and what is wrong) unless whole.

    Checked: the record ``summary.json`` beside it keeps (row count and sha256; ``record`` overrides
    it; files without one, e.g. older runs', get the other checks only), the header, every line's
    fields and numbers, a final line end, and completeness: every (split, task, metric, layer) has
    the same steps, every (split, task, metric) of the probes every probe layer, and every split
    with probes the same tasks and metrics. A file cut short anywhere (a kill while writing, a copy
    interrupted) fails one of them instead of reporting half the rows.
    """
    path = Path(path)
    data = path.read_bytes()
    if record is None and (path.parent / SUMMARY).is_file():
        record = read_summary(path.parent / SUMMARY).get("metrics_csv")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file ({err}); it is damaged; {RERUN}") from err
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), []) if lines else []
    if header not in (COLUMNS, BASE_COLUMNS):        # BASE_COLUMNS: runs written before with_prior / gain
        raise ValueError(f"{path} does not start with the header {','.join(COLUMNS)}: it is not a metrics.csv "
                         f"written by train.py or evaluate.py, or it is damaged; {RERUN}")
    if not text.endswith("\n"):
        raise ValueError(f"{path} ends in the middle of line {len(lines)}: it was truncated; {RERUN}")
    rows = []
    for n, fields in enumerate(csv.reader(lines[1:]), start=2):
        if len(fields) != len(header) or any(f == "" for f in fields[:len(BASE_COLUMNS)]):
            raise ValueError(f"{path}, line {n}: {len(fields)} fields ({','.join(fields)[:80]!r}), expected "
                             f"{len(header)} with the first {len(BASE_COLUMNS)} non-empty: the file is truncated or "
                             f"damaged; {RERUN}")
        r = dict(zip(header, fields))
        for c in OPTIONAL_NUMBERS:
            if r.get(c) == "":
                r.pop(c)
        for key in ("step", "timestep", "value", *(c for c in OPTIONAL_NUMBERS if c in r)):
            try:
                r[key] = int(r[key]) if key == "step" else float(r[key])
            except ValueError:
                raise ValueError(f"{path}, line {n}: {key} {r[key]!r} is not a number: the file is damaged or "
                                 f"was edited; {RERUN}") from None
        rows.append(r)
    if not rows:
        raise ValueError(f"{path} has no rows (only the header): the run was killed while writing it, or wrote "
                         f"nothing; {RERUN}")
    gaps = incomplete(rows)
    if gaps:
        raise ValueError(f"{path} is incomplete (cut short, or written by a run that was killed): "
                         + "; ".join(gaps[:4]) + (f"; and {len(gaps) - 4} more" if len(gaps) > 4 else "")
                         + f". {RERUN}")
    if record and hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise ValueError(f"{path} does not match the record in {path.parent / SUMMARY} ({len(rows)} rows here, "
                         f"{record.get('rows')} recorded, and other bytes): it was half-written, cut short or edited "
                         f"after the run; {RERUN}")
    return rows


def incomplete(rows: list[dict]) -> list[str]:
    """What a complete ``metrics.csv`` would hold that ``rows`` lack (see :func:`read_metrics_csv`)."""
    steps = sorted({r["step"] for r in rows})
    probe_layers = list(dict.fromkeys(r["layer"] for r in rows if r["layer"] not in NOT_PROBES))
    have: dict[tuple, set[int]] = {}
    for r in rows:
        have.setdefault((r["split"], r["task"], r["metric"], r["layer"]), set()).add(r["step"])
    gaps = []
    for (split, task, metric, layer), got in have.items():
        missing = [s for s in steps if s not in got]
        if missing:
            gaps.append(f"{split} {task}/{metric}: layer {layer} lacks steps {missing}")
    groups = dict.fromkeys((s, t, m) for s, t, m, layer in have if layer not in NOT_PROBES)
    for split, task, metric in groups:
        absent = [l for l in probe_layers if (split, task, metric, l) not in have]
        if absent:
            gaps.append(f"{split} {task}/{metric}: no rows for layer(s) {absent}")
    scores = {}
    for split, task, metric in groups:
        if metric not in NOT_SCORES:
            scores.setdefault(split, set()).add(f"{task}/{metric}")
    every = set().union(*scores.values()) if scores else set()
    for split, got in scores.items():
        if got != every:
            gaps.append(f"{split} has no rows for {sorted(every - got)} (another split has)")
    return gaps


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
