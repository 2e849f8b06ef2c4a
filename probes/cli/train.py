"""``fit``/``validate``/``test``: LightningCLI wiring, with run folders, the pre-flight check, the outputs and
classifier callbacks, and testing right after fitting."""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from probes.cli.compose import add_defaults_key
from probes.cli.convention import prepared
from probes.cli.errors import ExplainedLightningParser
from probes.cli.preflight import PreflightFailed, check_prerequisites, format_missing
from probes.experiments.classify.stage import ClassifierScores
from probes.reporting.run_outputs import RunOutputs


def _run_name(cfg: Namespace) -> str:
    configs = cfg.get("config") or []
    stem = Path(str(configs[-1])).stem if configs else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


TRAIN_COMMANDS = ("fit", "validate", "test", "predict")
#: set by a command that chains several fits (the demo): their W&B runs share a group and a wandb/ folder
WANDB_GROUP_ENV, WANDB_DIR_ENV = "DPROBE_WANDB_GROUP", "DPROBE_WANDB_DIR"


def wandb_defaults(init_args: Namespace, run_dir: str, environ: dict | None = None) -> None:
    """Fill what a W&B logger's config left open: the run's name (its folder: the config's name and
    time, or the demo's run label), its group and its ``wandb/`` folder (the chaining command's, so
    that one ``wandb sync`` sends an experiment; otherwise the run folder)."""
    env = os.environ if environ is None else environ
    if "save_dir" in init_args and init_args.save_dir in (None, ".", "", "outputs"):
        init_args.save_dir = env.get(WANDB_DIR_ENV) or run_dir
    if init_args.get("name") is None:
        init_args.name = Path(run_dir).name
    if init_args.get("group") is None and env.get(WANDB_GROUP_ENV):
        init_args.group = env[WANDB_GROUP_ENV]


def train_main(argv: Sequence[str] | None = None) -> None:
    """``train.py`` / ``diffusion-probes fit``: LightningCLI over the probe modules and the activation data module."""
    from probes.training.datamodule import ActivationDataModule
    from probes.training.module import ProbeModule

    args = prepared(argv)
    try:
        ProbeCLI(ProbeModule, ActivationDataModule, subclass_mode_model=True, args=args)
    finally:
        finish_wandb()   # a run called in-process (a notebook, the demo, tests) ends its W&B run and flushes it


def finish_wandb() -> None:
    """Close the open W&B run, if any: Lightning leaves it open, and a second run would reuse it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class ProbeCLI(LightningCLI):
    """``python train.py fit --config configs/...yaml``: fits every probe, then tests and writes outputs.

    Adds ``--run_dir`` (default ``outputs/runs/<config name>-<time>``), which becomes the trainer's
    ``default_root_dir`` and the logger's ``save_dir``, and the ``outputs`` callback group. Once the
    classes exist and before anything is computed, the pre-flight check (``probes.cli.preflight``)
    lists every missing prerequisite at once and exits non-zero. A run that fails leaves no empty
    run folder behind.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", ExplainedLightningParser)   # a parse error is explained, not a usage dump
        self._run_dir: Path | None = None
        self._run_dir_existed = True
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._remove_empty_run_dir()
            raise

    def _remove_empty_run_dir(self) -> None:
        """Delete the run folder this run created if it holds no file (a failed start leaves no trace)."""
        run = self._run_dir
        if run is None or self._run_dir_existed or not run.is_dir():
            return
        if not any(p.is_file() or p.is_symlink() for p in run.rglob("*")):
            shutil.rmtree(run, ignore_errors=True)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="output folder of this run (default: outputs/runs/<config>-<time>)")
        add_defaults_key(parser)
        parser.add_lightning_class_args(RunOutputs, "outputs")
        # the replication's classifier experiment (inactive without a name): a stage of the run, not of the data
        parser.add_lightning_class_args(ClassifierScores, "classifier")
        # one-pass probes must see each training image exactly once: the data learns it from the model
        parser.link_arguments("model", "data.exact_train_shards", compute_fn=lambda m: bool(m.one_pass),
                              apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir") or cfg.trainer.get("default_root_dir") or str(Path("outputs/runs") / _run_name(cfg))
        cfg.run_dir = run_dir
        cfg.trainer.default_root_dir = run_dir
        loggers = cfg.trainer.get("logger")
        for lg in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(lg, Namespace) and "init_args" in lg:
                if str(lg.get("class_path", "")).endswith("WandbLogger"):
                    wandb_defaults(lg.init_args, run_dir)
                elif "save_dir" in lg.init_args and lg.init_args.save_dir in (None, ".", "", "outputs"):
                    lg.init_args.save_dir = run_dir
        callbacks = cfg.trainer.get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(cb, Namespace) and str(cb.get("class_path", "")).endswith("ModelCheckpoint") \
                    and cb.init_args.get("dirpath") is None:
                cb.init_args.dirpath = str(Path(run_dir) / "checkpoints")  # resume: --ckpt_path <run>/checkpoints/last.ckpt
        self._run_dir = Path(run_dir)                       # created when work starts (_start_run)
        self._run_dir_existed = self._run_dir.exists()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The pre-flight check (prompts, weights, labelers, splits, disk) first: data and model exist by
        now, and nothing has been computed; the trainer's banner would only bury the message."""
        dm = self.datamodule
        if self.subcommand is not None and hasattr(dm, "disk_needs"):
            stages = [self.config_init[self.subcommand].get(key) for key in self._parser(self.subcommand).callback_keys]
            missing = check_prerequisites(dm, self.model, self.subcommand, [s for s in stages if s is not None])
            if missing:
                raise PreflightFailed(format_missing(missing))
        return super().instantiate_trainer(**kwargs)

    def _start_run(self) -> None:
        if self._run_dir is not None:
            self._run_dir.mkdir(parents=True, exist_ok=True)

    def before_fit(self) -> None:
        self._start_run()

    def before_validate(self) -> None:
        self._start_run()

    def before_test(self) -> None:
        self._start_run()

    def after_fit(self) -> None:
        """Test the fitted probes (selection happened on val) so every fit ends with outputs."""
        if self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
