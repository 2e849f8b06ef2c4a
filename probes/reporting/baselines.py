"""Is the probe reading knowledge, or something cheaper? The model against its controls.

One row per task (its headline metric): each run's best head, picked on validation and scored on
test, next to the position-only baseline (pixel coordinates alone, ``probes.metrics.position``),
with the margins a reader wants: model minus permuted-weights control, model minus position.
"""
from __future__ import annotations

from collections.abc import Mapping

from probes.metrics.position import POSITION
from probes.reporting.markup import MISSING, fmt_value, table
from probes.reporting.tables import reported_heads
from probes.tasks import LOWER_IS_BETTER, get_task


def _position_value(rows: list[dict], task: str, metric: str) -> float | None:
    vals = [r["value"] for r in rows if r["layer"] == POSITION and r["split"] == "test"
            and r["task"] == task and r["metric"] == metric]
    return vals[0] if vals else None


def compare_runs(runs: Mapping[str, list[dict]]) -> list[dict]:
    """Rows ``{task, metric, <run>: test value of its val-picked best head, ..., position, margins}``.

    A run without validation split selects nothing (never on test): it is represented by the
    pre-declared layer at the last step, and its head is labelled so.
    The first run is the model; margins are taken against every other run and the position
    baseline (signed so that positive means the model is better, also for lower-is-better metrics).
    """
    names = list(runs)
    model = names[0]
    best = {n: {(b["task"], b["metric"]): b for b in reported_heads(rows)} for n, rows in runs.items()}
    tasks = list(dict.fromkeys(b["task"] for b in best[model].values()))
    out = []
    for task in tasks:
        metric = get_task(task).primary
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        row: dict = {"task": task, "metric": metric}
        for n in names:
            b = best[n].get((task, metric))
            row[n] = b.get("test") if b else None
            fixed = " (pre-declared: no val split)" if b and b.get("selected_on") != "val" else ""
            row[f"{n} head"] = f"{b['layer']} @ step {b['step']}{fixed}" if b else None
        row["position"] = _position_value(runs[model], task, metric)
        for other in [*names[1:], "position"]:
            if row[model] is not None and row.get(other) is not None:
                row[f"margin vs {other}"] = sign * (row[model] - row[other])
        out.append(row)
    return out


def comparison_markdown(rows: list[dict], names: list[str]) -> str:
    """The comparison as a Markdown table (numbers to 3 decimals)."""
    others = [*names[1:], "position"]
    head = ["task", "metric", *[f"{n} (test, head picked on val)" for n in names], "position only",
            *[f"{names[0]} − {o}" for o in others]]
    body = [[r["task"], r["metric"],
             *[f"{fmt_value(r[n])} ({r[f'{n} head']})" if r[n] is not None else MISSING for n in names],
             fmt_value(r["position"]), *[fmt_value(r.get(f"margin vs {o}")) for o in others]] for r in rows]
    return table(head, body)[0]
