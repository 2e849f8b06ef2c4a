"""``diffusion-probes fit|validate|test|evaluate|report``: one console command for every stage.

``fit`` (and ``validate``/``test``) are ``train.py``'s LightningCLI; ``evaluate`` is
``evaluate.py``; ``report`` compares finished runs. Every command accepts ``--import MODULE_OR_FILE``
(user labelers, tasks, layers), imported before its config is parsed and checked.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from probes.cli.compose import expand_configs
from probes.cli.plugins import load_plugins, strip_imports

USAGE = """usage: diffusion-probes {fit,validate,test,evaluate,report} [options]

  fit        train every probe, then test and write outputs    (= python train.py fit ...)
  evaluate   test exported probes on a store                   (= python evaluate.py ...)
  report     compare finished runs in a report of their own
  each takes --help, --config FILE.yaml, --print_config, and --import MODULE_OR_FILE
"""
TRAIN_COMMANDS = ("fit", "validate", "test", "predict")


def train_main(argv: Sequence[str] | None = None) -> None:
    """``train.py``: LightningCLI over the probe modules and the activation data module."""
    from probes.cli.train import ProbeCLI
    from probes.training.datamodule import ActivationDataModule
    from probes.training.module import ProbeModule

    argv = list(sys.argv[1:] if argv is None else argv)
    load_plugins(argv)
    ProbeCLI(ProbeModule, ActivationDataModule, subclass_mode_model=True, args=expand_configs(strip_imports(argv)))


def evaluate_main(argv: Sequence[str] | None = None) -> None:
    from probes.cli.evaluate import evaluate_main as run

    argv = list(sys.argv[1:] if argv is None else argv)
    load_plugins(argv)
    run(expand_configs(strip_imports(argv)))


def report_main(argv: Sequence[str] | None = None) -> None:
    from probes.cli.evaluate import report_main as run

    run(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd in TRAIN_COMMANDS:
        train_main([cmd, *rest])
    elif cmd == "evaluate":
        evaluate_main(rest)
    elif cmd == "report":
        report_main(rest)
    else:
        sys.exit(f"diffusion-probes: unknown command {cmd!r}\n{USAGE}")


if __name__ == "__main__":
    main()
