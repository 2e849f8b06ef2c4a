"""Run outputs: after testing, write metrics.csv, the probe export, plots, panels and the report.

A callback rather than code in the module, so that ``train.py`` and ``evaluate.py`` produce the
same outputs, and the module stays about training probes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from probes.experiments.classify.stage import classifier_rows
from probes.export.probeset import export_probes
from probes.metrics.decoded import decoded_rows
from probes.metrics.position import position_rows
from probes.reporting.html import write_report
from probes.reporting.panels import build_panels, panel_indices, plot_panel
from probes.reporting.plots import plot_all
from probes.reporting.tables import best_heads, format_table, write_metrics_csv


class RunOutputs(pl.Callback):
    """Write the run's results into ``out_dir`` (default: the trainer's ``default_root_dir``).

    :param out_dir: output folder; ``None`` uses the run folder.
    :param export: write the probe export (``probes/``) and log it as a W&B artifact.
    :param plots: write PNG plots (``plots/``) and the report (``report.md``, ``report.html``).
    :param panels: validation images shown in prediction panels (0: none).
    :param compare: other runs (folders with a metrics.csv) to compare with in the report.
    :param link_store: symlink the activation store into the run folder (``store``).
    """

    def __init__(self, out_dir: str | None = None, export: bool = True, plots: bool = True, panels: int = 4,
                 compare: list[str] | None = None, link_store: bool = True) -> None:
        self.out_dir, self.export, self.plots, self.panels = out_dir, export, plots, panels
        self.compare, self.link_store = list(compare or []), link_store
        self.written: dict[str, Any] = {}
        self._panel_indices: set[int] = set()
        #: streamed activations are gone after their batch: the panel images' are kept here (CPU, fp16)
        self.panel_acts: dict[int, dict[str, Any]] = {}

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir)

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if self.panels and dm is not None and getattr(module, "spec", None) is not None and module.spec.streaming:
            self._panel_indices = set(panel_indices(dm, self.panels))

    def on_validation_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._panel_indices or trainer.sanity_checking:
            return
        for j, i in enumerate(torch.as_tensor(batch["index"]).tolist()):
            if i in self._panel_indices:
                self.panel_acts[i] = {n: a[j].detach().to("cpu", torch.float16) for n, a in batch["acts"].items()}

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        out = self.run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        rows = [r for split in ("val", "test") for r in module.results.get(split, [])]
        dm = getattr(trainer, "datamodule", None)
        if dm is not None:
            rows += decoded_rows(module, dm)  # the labeler on decoded intermediate images, per step
            rows += classifier_rows(dm)       # the classifier on the same images, per step (data.classifier)
            rows += position_rows(module, dm)  # what pixel coordinates alone predict
        spec = module.spec
        self.written["metrics"] = write_metrics_csv(rows, out / "metrics.csv")
        best = best_heads(rows)
        summary = {"model": spec.model, "is_random": spec.is_random, "store_dir": spec.store_dir, "best": best,
                   "num_probes": len(module.banks) * len(spec.layers) * len(spec.steps)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if self.export:
            self.written["probes"] = export_probes(module, out / "probes", extra={"best": best})
        panels = {}
        if self.plots:
            suffix = "  [RANDOM WEIGHTS: meaningless]" if spec.is_random else ""
            self.written["plots"] = plot_all(rows, out / "plots", "test", suffix)
            if self.panels and dm is not None and dm.store is not None:
                panels = build_panels(module, dm, best, self.panels, self.panel_acts)
                self.written["panels"] = {t: plot_panel(t, p, out / "plots" / f"panel_{t}.png") for t, p in panels.items()}
            self.written["report"] = write_report(out, rows, spec.is_random, self.compare)
        if self.link_store:
            link = out / "store"
            if not link.exists() and not link.is_symlink():
                try:
                    os.symlink(os.path.abspath(spec.store_dir), link, target_is_directory=True)
                except OSError:
                    pass
        for logger in trainer.loggers:
            log_results = getattr(logger, "log_results", None)
            if callable(log_results):
                log_results(rows, best, self.written, panels)
        print(format_table(rows, spec.is_random), flush=True)
        print(f"\nOutputs: {out.resolve()}  (report.html, metrics.csv, probes/, plots/, summary.json)", flush=True)
