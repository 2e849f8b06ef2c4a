"""Run outputs: after testing, write metrics.csv, the probe export, plots, panels and the report.

A callback rather than code in the module, so that ``train.py`` and ``evaluate.py`` produce the
same outputs, and the module stays about training probes. It only writes: what it writes is
computed by :func:`probes.reporting.results.collect_results`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from probes.common.files import atomic_write_text, output_dir
from probes.export.probeset import write_export
from probes.metrics.per_image import FILE
from probes.reporting.html import write_report
from probes.reporting.panels import panel_indices, plot_panel
from probes.reporting.plots import PUBLISHED_MODELS, plot_all
from probes.reporting.results import RunResults, collect_results
from probes.reporting.tables import SUMMARY, format_table, metrics_record, write_metrics_csv


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
        dm = getattr(trainer, "datamodule", None)
        results = collect_results(module, dm, trainer.callbacks, export=self.export,
                                  panels=self.panels if self.plots else 0, panel_acts=self.panel_acts)
        self.write(results, self.run_dir(trainer), trainer.loggers)

    def write(self, results: RunResults, out: Path, loggers: list[Any] = ()) -> None:
        """Write ``results`` into ``out`` (and to the loggers that take results)."""
        out.mkdir(parents=True, exist_ok=True)
        rows, best, spec_random = results.rows, results.best, bool(results.summary["is_random"])
        self.written["metrics"] = write_metrics_csv(rows, out / "metrics.csv")
        if results.per_image is not None:
            self.written["per_image"] = results.per_image.save(out / FILE)
        # written after metrics.csv, recording it: a reader tells a whole file from one cut short or edited
        summary = dict(results.summary, metrics_csv=metrics_record(out / "metrics.csv"))
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1, default=str))
        if results.export is not None:
            self.written["probes"] = write_export(results.export, out / "probes")
        if self.plots:
            suffix = "  [RANDOM WEIGHTS: meaningless]" if spec_random else ""
            sd14 = not spec_random and dict(results.summary.get("model") or {}).get("model_id") in PUBLISHED_MODELS
            self.written["plots"] = plot_all(rows, output_dir(out / "plots"), "test", suffix, published=sd14)
            if results.panels:
                self.written["panels"] = {t: plot_panel(t, p, out / "plots" / f"panel_{t}.png")
                                          for t, p in results.panels.items()}
            self.written["report"] = write_report(out, rows, spec_random, self.compare)
        if self.link_store:
            link = out / "store"
            if not link.exists() and not link.is_symlink():
                try:
                    os.symlink(os.path.abspath(results.summary["store_dir"]), link, target_is_directory=True)
                except OSError:
                    pass
        for logger in loggers:
            log_results = getattr(logger, "log_results", None)
            if callable(log_results):
                log_results(rows, best, self.written, results.panels, results.per_image)
        print(format_table(rows, spec_random), flush=True)
        print(f"\nOutputs: {out.resolve()}  (report.html, metrics.csv, probes/, plots/, summary.json)", flush=True)
