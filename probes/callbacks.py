"""Run outputs: after testing, write metrics.csv, the probe export, plots and the results table.

A callback rather than code in the module, so that ``train.py`` and ``evaluate.py`` produce the
same outputs, and the module stays about training probes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from probes.export import export_probes
from probes.plots import plot_all
from probes.report import best_heads, format_table, write_metrics_csv


class RunOutputs(pl.Callback):
    """Write the run's results into ``out_dir`` (default: the trainer's ``default_root_dir``).

    :param out_dir: output folder; ``None`` uses the run folder.
    :param export: write the probe export (``probes/``).
    :param plots: write PNG plots (``plots/``).
    :param link_store: symlink the activation store into the run folder (``store``).
    """

    def __init__(self, out_dir: str | None = None, export: bool = True, plots: bool = True,
                 link_store: bool = True) -> None:
        self.out_dir, self.export, self.plots, self.link_store = out_dir, export, plots, link_store
        self.written: dict[str, Any] = {}

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        out = self.run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        rows = [r for split in ("val", "test") for r in module.results.get(split, [])]
        spec = module.spec
        self.written["metrics"] = write_metrics_csv(rows, out / "metrics.csv")
        best = best_heads(rows)
        summary = {"model": spec.model, "is_random": spec.is_random, "store_dir": spec.store_dir,
                   "best": best, "num_probes": sum(len(spec.layers) * len(spec.steps) for _ in module.banks)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if self.export:
            self.written["probes"] = export_probes(module, out / "probes", extra={"best": best})
        if self.plots:
            suffix = "  [RANDOM WEIGHTS: meaningless]" if spec.is_random else ""
            self.written["plots"] = plot_all(rows, out / "plots", "test", suffix)
        if self.link_store:
            link = out / "store"
            if not link.exists() and not link.is_symlink():
                try:
                    os.symlink(os.path.abspath(spec.store_dir), link, target_is_directory=True)
                except OSError:
                    pass
        for logger in trainer.loggers:
            log_tables = getattr(logger, "log_results", None)
            if callable(log_tables):
                log_tables(rows, best, self.written)
        print(format_table(rows, spec.is_random), flush=True)
        print(f"\nOutputs: {out.resolve()}  (metrics.csv, probes/, plots/, summary.json)", flush=True)
