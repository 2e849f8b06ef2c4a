"""Evaluate exported probes, and write reports that compare runs.

``python evaluate.py --probes <export dir or W&B artifact>`` rebuilds the data module from the
export's recorded data config (the store is reused; missing samples or labels are made), runs
validation (for the best-head selection) and test, and writes ``metrics.csv``, ``summary.json``,
plots, prediction panels and ``report.html`` into ``--out`` (default ``<export>/../eval-<time>``).
``--compare RUN ...`` adds other runs (e.g. the permuted-weights control) to the report.

``diffusion-probes report RUN [RUN ...]`` only writes a report comparing existing runs (no
evaluation), into a folder of its own (``--out``; default ``outputs/reports/<runs>-<time>``):
no run's own report is overwritten.

Both are read with the project's CLI convention (:mod:`probes.cli.convention`): ``--config
file.yaml``, ``--print_config``, and any option overridden on the command line.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from probes.common.files import atomic_write_bytes, output_dir, regular_files
from probes.experiments.classify.stage import ClassifierScores
from probes.export.probeset import load_probes
from probes.export.rebuild import module_from_export
from probes.export.resolve import resolve_probes
from probes.prompts.sets import split_indices
from probes.reporting.html import write_report
from probes.reporting.run_outputs import RunOutputs
from probes.reporting.tables import read_metrics_csv, read_summary
from probes.training.datamodule import ActivationDataModule


def evaluate(probes: str, out: str | None = None, store_dir: str | None = None,
             store_root: str = "outputs/stores", trust_export_store: bool = False,
             prompts_dir: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
             accelerator: str = "auto", device: str | None = None, plots: bool = True,
             compare: list[str] | None = None) -> RunOutputs:
    """Test exported probes on their recorded data (or another store) and write the run's outputs.

    An export may come from anyone (a W&B artifact), so the folders it records are not written to
    unless asked: the activation store is ``store_dir`` if given, else the store of the recorded
    settings under ``store_root`` (made there if missing), and the recorded ``store_dir`` only with
    ``trust_export_store``; the recorded download caches (``diffusion.cache_dir``,
    ``prompts.cache_dir``) are likewise dropped for the defaults unless trusted.

    :param probes: probe export folder (probes.json + probes.safetensors) or W&B artifact
        reference ``entity/project/name:version``.
    :param out: output folder (default: ``eval-<time>`` next to the export).
    :param store_dir: evaluate on this activation store.
    :param store_root: without ``store_dir``: parent of the store folder named by the settings' fingerprint
        (the same default as ``data.store_root``, so a run's own store is found again).
    :param trust_export_store: use the store folder (and caches) the export records (e.g. your own run's
        export whose store lies elsewhere).
    :param prompts_dir: local folder with the reference prompt CSVs (sets ``data.prompts.local_dir``).
    :param batch_size: images per batch (default: as recorded).
    :param num_workers: DataLoader workers (default: as recorded).
    :param accelerator: ``auto``, ``cpu`` or ``gpu``.
    :param device: where missing generation/labels run (``auto``, ``cpu``, ``cuda``).
    :param plots: write plots, panels and the report.
    :param compare: other runs (folders with a metrics.csv) to compare with in the report.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    path = resolve_probes(probes)
    module = module_from_export(path)
    cfg = data_config_to_use(dict(module.spec.data_config), store_dir, store_root, trust_export_store)
    overrides = {k: v for k, v in dict(batch_size=batch_size, num_workers=num_workers,
                                         device=device).items() if v is not None}
    if prompts_dir:
        cfg["prompts"] = dict(cfg["prompts"], local_dir=prompts_dir)
    dm = ActivationDataModule.from_config(cfg, **overrides)
    out = Path(out) if out else path.resolve().parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = RunOutputs(out_dir=str(out), export=False, plots=plots, link_store=False, compare=list(compare or []))
    # the run's other stages, as the export recorded them (exports before that kept the classifier in the data config)
    recorded = load_probes(path).meta.get("classifier") or cfg.get("classifier")
    stages = [ClassifierScores.from_config(recorded)] if recorded else []
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[*stages, outputs],
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out))
    if split_indices(dm.records())["val"]:
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return outputs


#: folders an export's data config names that a run writes into (the store, download caches)
WRITTEN_PATHS = (("store_dir",), ("diffusion", "cache_dir"), ("prompts", "cache_dir"))


def data_config_to_use(recorded: dict, store_dir: str | None, store_root: str, trust: bool) -> dict:
    """The export's data config with the folders it would write into taken from here, not from the export
    (see :func:`evaluate`): ``store_dir`` given wins; else, unless ``trust``, the recorded store and
    caches are dropped and the store lives under ``store_root``."""
    cfg = {k: dict(v) if isinstance(v, dict) or hasattr(v, "keys") else v for k, v in recorded.items()}
    if store_dir is not None:
        cfg["store_dir"] = store_dir
    elif not trust:
        for keys in WRITTEN_PATHS:
            holder = cfg
            for k in keys[:-1]:
                holder = holder.get(k) or {}
            if isinstance(holder, dict) and holder.get(keys[-1]):
                holder[keys[-1]] = None
    cfg["store_root"] = store_root
    return cfg


def report(runs: list[str], labels: list[str] | None = None, out: str | None = None) -> Path:
    """Write a report comparing finished runs, into a folder of its own.

    :param runs: run folders (each with a metrics.csv); the first is the reference run.
    :param labels: names of the runs in the report, in order (default: folder names).
    :param out: output folder (default: ``outputs/reports/<run names>-<time>``).
    """
    return comparison_report(runs, labels, out)


def comparison_report(runs: list[str], labels: list[str] | None = None, out: str | None = None,
                      sections: Sequence[tuple[str, str, str]] = ()) -> Path:
    """:func:`report`, with ``sections`` (``(heading, Markdown, HTML)``) that a caller measured
    beside the probes put first (the demo's sample quality)."""
    if not runs:
        raise ValueError("report needs at least one run folder")
    first = Path(runs[0])
    if not (first / "metrics.csv").exists():
        raise FileNotFoundError(f"{first} has no metrics.csv: pass run folders written by train.py or evaluate.py")
    summary = first / "summary.json"
    is_random = bool(read_summary(summary).get("is_random", False)) if summary.exists() else False
    rows = read_metrics_csv(first / "metrics.csv")   # every run's file checked before anything is written
    for other in runs[1:]:
        read_metrics_csv(Path(other) / "metrics.csv" if Path(other).is_dir() else Path(other))
    stem = "-vs-".join(Path(r).name for r in runs)[:80]
    dest = Path(out) if out else Path("outputs/reports") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    # the first run's own plots and panels come along, so the comparison folder is one self-contained report
    # (real files only: a link planted in the run folder may point anywhere, and is never followed)
    for png in regular_files(first / "plots", "*.png"):
        if not png.name.startswith("compare_"):
            atomic_write_bytes(output_dir(dest / "plots") / png.name, png.read_bytes())
    md, html = write_report(dest, rows, is_random, [Path(r) for r in runs[1:]],
                            labels, title=f"Comparison: {', '.join(labels or [Path(r).name for r in runs])}",
                            sections=sections)
    print(f"Report: {html} (and {md.name})")
    return dest


def report_args(argv: Sequence[str]) -> list[str]:
    """``RUN RUN --labels A B --out X`` (as the README writes it) -> jsonargparse's list syntax.

    jsonargparse reads a list option only as one ``[a, b]`` value; people type the runs one after
    the other. ``--runs [a, b]`` and ``--labels [a, b]`` are passed through unchanged.
    """
    runs: list[str] = []
    out: list[str] = []
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg in ("--labels", "--runs"):
            vals = []
            k += 1
            while k < len(argv) and not argv[k].startswith("--"):
                vals.append(argv[k])
                k += 1
            if len(vals) == 1 and vals[0].lstrip().startswith("["):
                out += [arg, vals[0]]
            elif arg == "--runs":
                runs += vals
            else:
                out += [arg, json.dumps(vals)]
        elif arg.startswith("-"):
            out.append(arg)
            takes_value = "=" not in arg and arg not in ("-h", "--help", "--print_config")
            if takes_value and k + 1 < len(argv):
                out.append(argv[k + 1])
                k += 1
            k += 1
        else:
            runs.append(arg)
            k += 1
    return (["--runs", json.dumps(runs)] if runs else []) + out
