"""What a run sends to W&B, built as plain objects so tests can check rows and files offline.

- ``results/metrics``: one row per (split, task, layer, step, timestep, metric);
- per task and metric, a line chart (metric vs step, one line per layer) and a layer x step
  heatmap, both W&B custom charts drawn from a ``wandb.Table`` so runs overlay in one dashboard;
- the PNG plots and the prediction panels (also as a table: image | label | prediction per step);
- the probe export as an artifact of type ``probes``, with the export's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from probes.reporting.beyond_position import summarize
from probes.reporting.markup import tick_timestep
from probes.reporting.tables import COLUMNS, NOT_SCORES

ARTIFACT_TYPE = "probes"


def metrics_table(rows: list[dict]):
    import wandb

    return wandb.Table(columns=COLUMNS, data=[[r.get(c) for c in COLUMNS] for r in rows])


def charts(rows: list[dict], split: str = "test") -> dict[str, Any]:
    """``charts/<split>/<task>/<metric>/{vs_step,heatmap}`` custom charts."""
    import wandb

    out = {}
    pairs = dict.fromkeys((r["task"], r["metric"]) for r in rows if r["split"] == split and r["metric"] not in NOT_SCORES)
    for task, metric in pairs:
        sel = [r for r in rows if r["split"] == split and r["task"] == task and r["metric"] == metric]
        table = wandb.Table(columns=["step", "timestep", "layer", "value"],
                            data=[[r["step"], round(r["timestep"], 1), r["layer"], r["value"]] for r in sel])
        key = f"charts/{split}/{task}/{metric}"
        out[f"{key}/vs_step"] = wandb.plot.line(table, "step", "value", stroke="layer",
                                                title=f"{task}: {metric} vs denoising step ({split}), one line per layer")
        heat = wandb.Table(columns=["layer", "step", "value"],
                           data=[[r["layer"], f"{r['step']:02d} (t={tick_timestep(r['timestep'])})", round(r["value"], 4)] for r in sel])
        out[f"{key}/heatmap"] = wandb.plot_table("wandb/confusion_matrix/v1", heat,
                                                 {"Actual": "layer", "Predicted": "step", "nPredictions": "value"},
                                                 {"title": f"{task}: {metric} ({split}), layer x step"})
    return out


def panel_table(task: str, panel: dict[str, Any]):
    """Rows (image index, step, timestep, image, label, prediction) of one task's panel."""
    import wandb

    table = wandb.Table(columns=["task", "layer", "index", "step", "timestep", "image", "label", "prediction"])
    binary = panel["labels"].max() <= 1.0 and panel["labels"].min() >= 0.0
    for r, idx in enumerate(panel["indices"]):
        lab = panel["labels"][r]
        lo, hi = (0.0, 1.0) if binary else (float(lab.min()), float(lab.max()) or 1.0)
        def scale(x, lo=lo, hi=hi):
            return (np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)
        for si, step in enumerate(panel["steps"]):
            table.add_data(task, panel["layer"], idx, step, round(float(panel["timesteps"][si]), 1), wandb.Image(panel["images"][r]),
                           wandb.Image(scale(lab)), wandb.Image(scale(panel["preds"][r, si])))
    return table


def probe_artifact(export_dir: Path, name: str):
    """The export folder as a W&B artifact of type ``probes``; metadata from ``probes.json``."""
    import wandb

    meta = json.loads((Path(export_dir) / "probes.json").read_text())
    probes = meta["probes"]
    art = wandb.Artifact(name=name, type=ARTIFACT_TYPE, description="Linear probes per (task, layer, step)", metadata={
        "format": meta["format"], "model": meta["model"], "code_version": meta["code_version"],
        "tasks": sorted({p["task"] for p in probes}), "layers": list(dict.fromkeys(p["layer"] for p in probes)),
        "steps": sorted({p["step"] for p in probes}), "num_probes": len(probes), "best": meta.get("best", [])})
    art.add_dir(str(export_dir))
    return art


#: columns of ``results/beyond_position``: per task, each estimate with its interval
BEYOND_COLUMNS = ["task", "metric", "n", "quantity", "head", "estimate", "low", "high", "distinguishable", "text"]


def beyond_position_rows(rows: list[dict], per_image: Any = None) -> list[list[Any]]:
    """Rows of ``results/beyond_position``: probe, prior, plane, differences and the gain, with intervals."""
    out = []
    for s in summarize(rows, per_image):
        heads = {"probe": s["probe_head"], "with_prior": s["gain_head"], "probe − prior": s["probe_head"],
                 "probe − plane": s["probe_head"], "gain": s["gain_head"]}
        for name, iv in s["intervals"].items():
            h = heads.get(name)
            head = f"{h['layer']} @ {h['step']}" if h else ""
            if iv is None:
                point = s["point"].get(name)
                out.append([s["task"], s["metric"], s["n"], name, head, point, None, None, None, ""])
            else:
                out.append([s["task"], s["metric"], iv.n, name, head, iv.estimate, iv.low, iv.high,
                            iv.distinguishable, str(iv)])
    return out


def beyond_position_table(rows: list[dict], per_image: Any = None):
    """The knowledge beyond position as a ``wandb.Table`` (None when the run has no position baselines)."""
    import wandb

    data = beyond_position_rows(rows, per_image)
    return wandb.Table(columns=BEYOND_COLUMNS, data=data) if data else None
