"""Evaluate exported probes, and write reports that compare runs.

``python evaluate.py --probes <export dir or W&B artifact>`` rebuilds the data module from the
export's recorded data config (the store is reused; missing samples or labels are made), runs
validation (for the best-head selection) and test, and writes ``metrics.csv``, ``summary.json``,
plots, prediction panels and ``report.html`` into ``--out`` (default ``<export>/../eval-<time>``).
``--compare RUN ...`` adds other runs (e.g. the permuted-weights control) to the report.

``python evaluate.py --report RUN [RUN ...]`` only writes the report of existing runs (no
evaluation): into the first run's folder, comparing it with the others.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl

from data.datamodule import ActivationDataModule
from data.prompts import default_cache_dir, split_indices
from probes.callbacks import RunOutputs
from probes.export import META, module_from_export
from probes.report import read_metrics_csv
from probes.report_html import write_report

ARTIFACT_REF = re.compile(r"^(wandb:|wandb-artifact://)?[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+$")


def resolve_probes(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local export folder, or a W&B artifact reference (``entity/project/name:version``)
    downloaded into the cache."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / META).exists():
            raise FileNotFoundError(f"{path} is not a probe export ({META} missing); pass the run's probes/ folder")
        return path
    ref = str(ref)
    if not ARTIFACT_REF.match(ref):
        raise FileNotFoundError(f"--probes {ref!r} is neither a folder nor a W&B artifact reference "
                                f"(entity/project/name:version)")
    import wandb

    name = re.sub(r"^(wandb:|wandb-artifact://)", "", ref)
    artifact = wandb.Api().artifact(name, type="probes")
    root = Path(cache_dir or default_cache_dir() / "artifacts") / name.replace("/", "_").replace(":", "_")
    return Path(artifact.download(root=str(root)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--probes", help="probe export folder (probes.json + probes.safetensors) or W&B artifact "
                                       "reference entity/project/name:version")
    what.add_argument("--report", nargs="+", metavar="RUN", help="only write the report of these runs")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN", help="runs to compare with in the report")
    p.add_argument("--labels", nargs="*", default=None, help="names of the runs in the report, in order")
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
             accelerator: str = "auto", device: str | None = None, plots: bool = True,
             compare: Sequence[str] = ()) -> RunOutputs:
    path = resolve_probes(probes)
    module = module_from_export(path)
    cfg = dict(module.spec.data_config)
    overrides = {k: v for k, v in dict(store_dir=store_dir, batch_size=batch_size, num_workers=num_workers,
                                         device=device).items() if v is not None}
    if prompts_dir:
        cfg["prompts"] = dict(cfg["prompts"], local_dir=prompts_dir)
    dm = ActivationDataModule.from_config(cfg, **overrides)
    out = Path(out) if out else path.resolve().parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = RunOutputs(out_dir=str(out), export=False, plots=plots, link_store=False, compare=list(compare))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[outputs],
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out))
    if split_indices(dm.records())["val"]:
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return outputs


def report(runs: Sequence[str], labels: Sequence[str] | None = None) -> tuple[Path, Path]:
    first = Path(runs[0])
    summary = first / "summary.json"
    is_random = json.loads(summary.read_text()).get("is_random", False) if summary.exists() else False
    return write_report(first, read_metrics_csv(first / "metrics.csv"), is_random, [Path(r) for r in runs[1:]], labels)


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.report:
        md, html = report(a.report + list(a.compare), a.labels)
        print(f"Report: {html} (and {md.name})")
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    evaluate(a.probes, a.out, a.store_dir, a.prompts_dir, a.batch_size, a.num_workers, a.accelerator, a.device,
             plots=not a.no_plots, compare=a.compare)
