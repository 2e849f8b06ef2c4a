"""Evaluate exported probes on the data they were trained for (or another store of the same shape).

``python evaluate.py --probes outputs/runs/<run>/probes`` rebuilds the data module from the
export's recorded data config (the store is reused; missing samples or labels are made), runs
validation (for the best-head selection) and test, and writes ``metrics.csv``, ``summary.json``
and plots into ``--out`` (default: ``<export>/../eval-<time>``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl

from data.datamodule import ActivationDataModule
from probes.callbacks import RunOutputs
from probes.export import module_from_export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", required=True, help="folder of a probe export (probes.json + probes.safetensors)")
    p.add_argument("--out", default=None, help="output folder (default: next to the export)")
    p.add_argument("--store_dir", default=None, help="evaluate on this activation store instead of the recorded one")
    p.add_argument("--prompts_dir", default=None,
                   help="local folder with the reference prompt CSVs (sets data.prompts.local_dir)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    p.add_argument("--device", default=None, help="where missing generation/labels run (auto, cpu, cuda)")
    p.add_argument("--no_plots", action="store_true")
    return p


def evaluate(probes: str | Path, out: str | Path | None = None, store_dir: str | None = None,
             prompts_dir: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
             accelerator: str = "auto", device: str | None = None, plots: bool = True) -> RunOutputs:
    module = module_from_export(probes)
    cfg = dict(module.spec.data_config)
    overrides = {k: v for k, v in dict(store_dir=store_dir, batch_size=batch_size, num_workers=num_workers,
                                         device=device).items() if v is not None}
    if prompts_dir:
        cfg["prompts"] = dict(cfg["prompts"], local_dir=prompts_dir)
    dm = ActivationDataModule.from_config(cfg, **overrides)
    out = Path(out) if out else Path(probes).resolve().parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = RunOutputs(out_dir=str(out), export=False, plots=plots, link_store=False)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[outputs],
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out))
    trainer.validate(module, datamodule=dm, verbose=False) if "val" in _splits(dm) else None
    trainer.test(module, datamodule=dm, verbose=False)
    return outputs


def _splits(dm: ActivationDataModule) -> set[str]:
    from data.prompts import split_indices

    return {s for s, idx in split_indices(dm.records()).items() if idx}


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    evaluate(a.probes, a.out, a.store_dir, a.prompts_dir, a.batch_size, a.num_workers, a.accelerator, a.device,
             plots=not a.no_plots)
