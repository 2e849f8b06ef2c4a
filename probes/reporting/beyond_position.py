"""Knowledge beyond position: each task's best heads against the position baselines, with intervals.

The headline of every report. Per task (its headline metric, test split, heads picked on
validation), from a run's ``metrics.csv`` rows and its per-image test scores:

- the best probe, the prior map and the plane, each a mean over test images with a 95 % bootstrap
  interval;
- probe − prior map and probe − plane, paired image by image;
- the **gain over position**: the best activation+prior head (the probe fitted on top of the prior
  map, picked on validation) minus the prior map, paired; "no gain over position" when its
  interval contains 0;
- aligned depth metrics (AbsRel, RMSE, δ<1.25) where the labels have a depth space;
- emergence relative to the prior map (:func:`probes.metrics.emergence.relative_emergence`): the
  first step holding 90 % of the final gain, "never" when the final gain is not distinguishable
  from 0.

:func:`compare` sets a model against its controls (differences paired by test image index: the
same images for a same-image control, the same prompt and seed for a control that draws its own).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from probes.metrics.baseline_rows import PLANE, PRIOR, describe, is_decoded
from probes.metrics.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Interval,
    difference_interval,
    format_interval,
    mean_interval,
)
from probes.metrics.emergence import relative_emergence
from probes.metrics.per_image import FILE, PerImageScores, align
from probes.reporting.markup import MISSING, fmt_value, table
from probes.reporting.tables import best_heads, read_metrics_csv, reported_heads
from probes.tasks import LOWER_IS_BETTER, get_task

#: aligned depth metrics and whether higher is better
ALIGNED = (("abs_rel", "AbsRel", False), ("rmse", "RMSE", False), ("delta1", "δ<1.25", True))
DECODED_NOTE = "ends at 1 by construction: the labels are this labeler's output on the final image"


def decoded_note(pi: PerImageScores | None, task: str) -> str:
    """What the decoded-image labeler's curve is scored against: its own output on the final image (it
    ends at 1 by construction), unless the run recorded another labeler for the labels (exact labels)."""
    info = pi.info if pi is not None else {}
    own, decoded = info.get("labeler", {}).get(task), info.get("decoded_labeler", {}).get(task)
    if own is not None and decoded is not None and own != decoded:
        return f"the labeler {decoded} scored against the labels of {own}: not 1 by construction"
    return DECODED_NOTE


def load_run(run: str | Path) -> tuple[list[dict], PerImageScores | None]:
    """A run folder's ``metrics.csv`` rows and its per-image scores (None for runs made before them)."""
    run = Path(run)
    pi = run / FILE
    return read_metrics_csv(run / "metrics.csv"), PerImageScores.load(pi) if pi.exists() else None


def _finite(*arrays: np.ndarray) -> np.ndarray:
    ok = np.ones(arrays[0].shape, bool)
    for a in arrays:
        ok &= np.isfinite(a)
    return ok


def _mean(x: np.ndarray | None, **kw: Any) -> Interval | None:
    if x is None:
        return None
    x = x[np.isfinite(x)]
    return mean_interval(x, **kw) if x.size >= 2 else None


def _diff(a: np.ndarray | None, b: np.ndarray | None, lower_is_better: bool = False, **kw: Any) -> Interval | None:
    """``a − b`` paired (``b − a`` for lower-is-better metrics, so positive always means ``a`` is better)."""
    if a is None or b is None:
        return None
    ok = _finite(a, b)
    if ok.sum() < 2:
        return None
    a, b = a[ok], b[ok]
    return difference_interval(b, a, **kw) if lower_is_better else difference_interval(a, b, **kw)


def verdict(iv: Interval | None, what: str = "gain over position") -> str:
    """A difference in words: ``gain over position``, ``no gain over position``, ``worse than position``."""
    if iv is None:
        return f"{what}: no per-image scores"
    if not iv.distinguishable:
        return f"no {what} ({format_interval(iv)})"
    if iv.estimate < 0:
        return f"negative {what}: worse than the baseline ({format_interval(iv)})"
    return f"{what} {format_interval(iv)}"


def _curve(rows: list[dict], task: str, metric: str, layer: str, column: str = "value") -> list[tuple[int, float]]:
    return sorted((r["step"], r[column]) for r in rows if r["split"] == "test" and r["task"] == task
                  and r["metric"] == metric and r["layer"] == layer and column in r)


def _prior_value(rows: list[dict], task: str, metric: str, name: str = PRIOR) -> float | None:
    v = [r["value"] for r in rows if r["split"] == "test" and r["task"] == task and r["metric"] == metric
         and r["layer"] == name]
    return v[0] if v else None


def task_summary(rows: list[dict], per_image: PerImageScores | None, task: str,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Everything the reports say about one task of one run (module docstring); intervals need ``per_image``."""
    metric = get_task(task).primary
    low = metric in LOWER_IS_BETTER
    kw = {"resamples": resamples, "seed": seed}
    out: dict[str, Any] = {"task": task, "metric": metric, "lower_is_better": low,
                           "n": int(per_image.index.size) if per_image is not None else None}
    probe = next((b for b in reported_heads(rows) if b["task"] == task and b["metric"] == metric), None)
    gain = next((b for b in best_heads(rows, column="with_prior") if b["task"] == task and b["metric"] == metric), None)
    pi = per_image if per_image is not None and task in per_image.metrics else None

    def scores(what: str, head: dict | None = None) -> np.ndarray | None:
        if pi is None:
            return None
        if head is not None:
            return pi.head(task, metric, head["layer"], head["step"], what) if pi.has(task, what) else None
        return pi.baseline(task, metric, what) if pi.has(task, what) else None

    # a head's scores need that head (none is picked without a validation split)
    p = scores("probe", probe) if probe is not None else None
    wp = scores("with_prior", gain) if gain is not None else None
    pr, pl = scores(PRIOR), scores(PLANE)
    out["probe_head"] = probe
    out["gain_head"] = gain
    out["point"] = {"probe": probe.get("test") if probe else None, "with_prior": gain.get("test") if gain else None,
                    "prior": _prior_value(rows, task, metric), "plane": _prior_value(rows, task, metric, PLANE)}
    out["intervals"] = {"probe": _mean(p, **kw), "prior": _mean(pr, **kw), "plane": _mean(pl, **kw),
                        "with_prior": _mean(wp, **kw),
                        "probe − prior": _diff(p, pr, low, **kw), "probe − plane": _diff(p, pl, low, **kw),
                        "gain": _diff(wp, pr, low, **kw)}
    out["verdict"] = verdict(out["intervals"]["gain"]) if gain else "no activation+prior heads in this run"
    out["aligned"] = {}
    if pi is not None:
        for what in ("probe", "with_prior", PRIOR, PLANE):
            a = pi.aligned(task, what)
            if a is not None:
                out["aligned"][what] = {name: _mean(a[name], **kw) for name, _, _ in ALIGNED}
        if pi.info.get("aligned_heads", {}).get(task):
            out["aligned_heads"] = pi.info["aligned_heads"][task]
    out["emergence"] = emergence_rows(rows, pi, task, metric, probe, gain, **kw)
    return out


def emergence_rows(rows: list[dict], pi: PerImageScores | None, task: str, metric: str, probe: dict | None,
                   gain: dict | None, **kw: Any) -> list[dict]:
    """Emergence relative to the prior map of the probe's layer, the activation+prior head's layer and the
    labeler on decoded images (module docstring)."""
    low = metric in LOWER_IS_BETTER
    base = _prior_value(rows, task, metric)
    if base is None:
        return []
    prior_scores = pi.baseline(task, metric, PRIOR) if pi is not None and pi.has(task, PRIOR) else None
    curves: list[tuple[str, str, str, str]] = []      # (label, layer, column, per-image kind)
    if probe:
        curves.append((f"probe, layer {probe['layer']}", probe["layer"], "value", "probe"))
    if gain:
        curves.append((f"activations + prior map, layer {gain['layer']}", gain["layer"], "with_prior", "with_prior"))
    decoded = next((r["layer"] for r in rows if r["task"] == task and r["split"] == "test" and is_decoded(r["layer"])),
                   None)
    if decoded:
        curves.append((describe(decoded), decoded, "value", "decoded"))
    out = []
    for label, layer, column, kind in curves:
        c = _curve(rows, task, metric, layer, column)
        if not c:
            continue
        steps, vals = [s for s, _ in c], [v for _, v in c]
        last = None
        if prior_scores is not None and pi is not None:
            if kind == "decoded" and pi.has(task, "decoded"):
                last = pi.decoded(task, metric, steps[-1])
            elif kind != "decoded" and pi.has(task, kind):
                last = pi.head(task, metric, layer, steps[-1], kind)
        final = _diff(last, prior_scores, low, **kw) if last is not None else None
        if final is not None and abs(final.estimate - ((base - vals[-1]) if low else (vals[-1] - base))) > 1e-4:
            final = None          # per-image scores of another selection: no interval rather than a wrong one
        e = relative_emergence(steps, vals, base, final, lower_is_better=low)
        note = e.note + (f"; {decoded_note(pi, task)}" if kind == "decoded" else "")
        out.append({"curve": label, "step": e.step, "cell": e.cell(), "note": note, "final": vals[-1],
                    "final_gain": final})
    return out


def summarize(rows: list[dict], per_image: PerImageScores | None, **kw: Any) -> list[dict[str, Any]]:
    """:func:`task_summary` of every probed task (in the order the rows name them)."""
    tasks = [t for t in dict.fromkeys(r["task"] for r in rows if r["layer"] == PRIOR)]
    return [task_summary(rows, per_image, t, **kw) for t in tasks]


def _cell(iv: Interval | None, point: float | None = None) -> str:
    if iv is not None:
        return format_interval(iv)
    return fmt_value(point) if point is not None else MISSING


def _head(h: dict | None) -> str:
    return f"{h['layer']} @ {h['step']}" if h else MISSING


def summary_table(summaries: Mapping[str, dict[str, Any]]) -> tuple[str, str]:
    """One row per run of one task: probe, prior, plane, probe − prior, activation+prior head, gain."""
    header = ["run", "best probe (layer @ step, picked on val)", "prior map", "plane", "probe − prior map",
              "activations + prior (layer @ step)", "gain over position"]
    body = []
    for name, s in summaries.items():
        iv, pt = s["intervals"], s["point"]
        body.append([name, f"{_cell(iv['probe'], pt['probe'])} ({_head(s['probe_head'])})",
                     _cell(iv["prior"], pt["prior"]), _cell(iv["plane"], pt["plane"]), _cell(iv["probe − prior"]),
                     f"{_cell(iv['with_prior'], pt['with_prior'])} ({_head(s['gain_head'])})", _cell(iv["gain"])])
    return table(header, body)


def aligned_table(summaries: Mapping[str, dict[str, Any]]) -> tuple[str, str] | None:
    """Aligned depth metrics (per-image least-squares scale and shift) of each run's heads and baselines."""
    body = []
    for name, s in summaries.items():
        for what, cells in s.get("aligned", {}).items():
            head = s.get("aligned_heads", {}).get(what)
            label = {"probe": "best probe", "with_prior": "activations + prior", PRIOR: "prior map",
                     PLANE: "plane"}[what] + (f" ({head[0]} @ {head[1]})" if head else "")
            body.append([name, label, *[_cell(cells[m]) for m, _, _ in ALIGNED]])
    if not body:
        return None
    return table(["run", "predictor", *[f"{title} ({'higher' if up else 'lower'} is better)" for _, title, up in ALIGNED]],
                 body)


def emergence_table(summary: dict[str, Any]) -> tuple[str, str]:
    return table(["curve", "emergence step", "final score", "final gain over prior map", "note"],
                 [[e["curve"], e["cell"], fmt_value(e["final"]), _cell(e["final_gain"]), e["note"]]
                  for e in summary["emergence"]])


def compare(model: tuple[list[dict], PerImageScores | None], control: tuple[list[dict], PerImageScores | None],
            task: str, **kw: Any) -> dict[str, Interval | None]:
    """Model − control, paired by test image index: the best probes, and the gains over their own priors."""
    metric = get_task(task).primary
    low = metric in LOWER_IS_BETTER
    out: dict[str, Interval | None] = {"probe": None, "gain": None}
    (mrows, mpi), (crows, cpi) = model, control
    if mpi is None or cpi is None or task not in mpi.metrics or task not in cpi.metrics:
        return out
    ia, ib = align(mpi, cpi)
    pick = {n: next((b for b in reported_heads(r) if b["task"] == task and b["metric"] == metric), None)
            for n, r in (("m", mrows), ("c", crows))}
    gpick = {n: next((b for b in best_heads(r, column="with_prior") if b["task"] == task and b["metric"] == metric),
                     None) for n, r in (("m", mrows), ("c", crows))}
    if pick["m"] and pick["c"]:
        a = mpi.head(task, metric, pick["m"]["layer"], pick["m"]["step"])[ia]
        b = cpi.head(task, metric, pick["c"]["layer"], pick["c"]["step"])[ib]
        out["probe"] = _diff(a, b, low, **kw)
    if gpick["m"] and gpick["c"] and mpi.has(task, "with_prior") and cpi.has(task, "with_prior"):
        ga = (mpi.head(task, metric, gpick["m"]["layer"], gpick["m"]["step"], "with_prior")
              - mpi.baseline(task, metric, PRIOR))[ia]
        gb = (cpi.head(task, metric, gpick["c"]["layer"], gpick["c"]["step"], "with_prior")
              - cpi.baseline(task, metric, PRIOR))[ib]
        out["gain"] = _diff(ga, gb, low, **kw)
    return out


def interval_record(iv: Interval | None) -> dict[str, Any] | None:
    """An interval as JSON (summary files, W&B tables)."""
    if iv is None:
        return None
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n, "statistic": iv.statistic,
            "distinguishable": iv.distinguishable, "text": format_interval(iv)}


def summary_record(s: dict[str, Any]) -> dict[str, Any]:
    """A task summary as JSON."""
    return {"task": s["task"], "metric": s["metric"], "n": s["n"], "verdict": s["verdict"],
            "probe_head": s["probe_head"], "gain_head": s["gain_head"], "point": s["point"],
            "intervals": {k: interval_record(v) for k, v in s["intervals"].items()},
            "aligned": {w: {m: interval_record(v) for m, v in c.items()} for w, c in s.get("aligned", {}).items()},
            "emergence": [{**{k: v for k, v in e.items() if k != "final_gain"},
                           "final_gain": interval_record(e["final_gain"])} for e in s["emergence"]]}


def markdown_section(rows: list[dict], per_image: PerImageScores | None, name: str = "this run",
                     **kw: Any) -> tuple[list[str], list[str]]:
    """The report's headline section for one run, as Markdown lines and HTML fragments."""
    md: list[str] = ["## Knowledge beyond position", "", INTRO, ""]
    hs: list[str] = ["<h2>Knowledge beyond position</h2>", f"<p>{INTRO}</p>"]
    for s in summarize(rows, per_image, **kw):
        n = f"{s['n']} test images" if s["n"] else "no per-image scores: no intervals"
        title = f"{s['task']} ({s['metric']}, {n})"
        m, h = summary_table({name: s})
        md += [f"### {title}", "", f"**{s['verdict']}**", "", m, ""]
        hs += [f"<h3>{title}</h3>", f"<p><b>{s['verdict']}</b></p>", h]
        al = aligned_table({name: s})
        if al:
            md += ["Aligned depth metrics (per-image least-squares scale and shift):", "", al[0], ""]
            hs += ["<p>Aligned depth metrics (per-image least-squares scale and shift):</p>", al[1]]
        m, h = emergence_table(s)
        md += ["Emergence relative to the prior map:", "", m, ""]
        hs += ["<p>Emergence relative to the prior map:</p>", h]
    return md, hs


INTRO = ("Test split; heads picked on validation. 95 % bootstrap intervals over test images (paired for "
         "differences); a difference whose interval contains 0 is 'not distinguishable'. Prior map: the mean "
         "train label per pixel (binary: thresholded where best on validation); plane: least squares in pixel "
         "coordinates. Gain over position: the best head fitted on top of the prior map (picked on validation) "
         "minus the prior map. Emergence: the first step at which a curve holds 90 % of its final gain over the "
         "prior map; 'never' when that gain is not distinguishable from 0.")
