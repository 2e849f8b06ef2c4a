"""``diffusion-probes fit|validate|test|evaluate|report|intervene|lens``: one console command for every stage.

``fit`` (and ``validate``/``test``) are ``train.py``'s LightningCLI; ``evaluate`` is
``evaluate.py``; ``report`` compares finished runs. Every command accepts ``--import MODULE_OR_FILE``
(user labelers, tasks, layers), imported before its config is parsed and checked.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from probes.cli.compose import expand_configs
from probes.cli.plugins import load_plugins, strip_imports
from probes.common.quiet import quiet_known_noise
from probes.common.threads import apply_thread_policy

USAGE = """usage: diffusion-probes {fit,validate,test,evaluate,report,intervene,lens,demo} [options]

  fit        train every probe, then test and write outputs    (= python train.py fit ...)
  evaluate   test exported probes on a store                   (= python evaluate.py ...)
  report     compare finished runs in a report of their own
  intervene  edit activations with exported probes, score the edited images (causal test)
  lens       semantic lens: which U-Net layer keeps object meaning (configs/lens/*.yaml)
  demo       the toy world's trained model vs its permuted control, side by side (make demo)
  each takes --help, --config FILE.yaml, --print_config, and --import MODULE_OR_FILE
"""
TRAIN_COMMANDS = ("fit", "validate", "test", "predict")


def train_main(argv: Sequence[str] | None = None) -> None:
    """``train.py``: LightningCLI over the probe modules and the activation data module."""
    from probes.cli.train import ProbeCLI
    from probes.training.datamodule import ActivationDataModule
    from probes.training.module import ProbeModule

    args = _prepared(argv)
    try:
        ProbeCLI(ProbeModule, ActivationDataModule, subclass_mode_model=True, args=args)
    finally:
        finish_wandb()   # a run called in-process (a notebook, the demo, tests) ends its W&B run and flushes it


def finish_wandb() -> None:
    """Close the open W&B run, if any: Lightning leaves it open, and a second run would reuse it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _prepared(argv: Sequence[str] | None, plugins: bool = True) -> list[str]:
    """What every command does first: thread policy, quiet logs, user plug-ins, config chains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_thread_policy()   # one torch thread per free core: a shared machine must not thrash
    quiet_known_noise()     # library messages a user cannot act on
    if not plugins:
        return argv
    load_plugins(argv)      # user labelers/tasks/layers are registered before their names are checked
    return expand_configs(strip_imports(argv))


def evaluate_main(argv: Sequence[str] | None = None) -> None:
    from probes.cli.evaluate import evaluate_main as run

    run(_prepared(argv))


def demo_main(argv: Sequence[str] | None = None) -> None:
    """``make demo``: the toy model and its permuted control, side by side (``probes/cli/demo.py``)."""
    from probes.cli.demo import demo_main as run

    run(_prepared(argv, plugins=False))


def report_main(argv: Sequence[str] | None = None) -> None:
    from probes.cli.evaluate import report_main as run

    run(list(sys.argv[1:] if argv is None else argv))


def intervene_main(argv: Sequence[str] | None = None) -> None:
    from probes.experiments.intervention.run import intervene_main as run

    run(_prepared(argv))


def lens_main(argv: Sequence[str] | None = None) -> None:
    from probes.experiments.lens.run import lens_main as run

    run(_prepared(argv))


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
    elif cmd == "intervene":
        intervene_main(rest)
    elif cmd == "lens":
        lens_main(rest)
    elif cmd == "demo":
        demo_main(rest)
    else:
        sys.exit(f"diffusion-probes: unknown command {cmd!r}\n{USAGE}")


if __name__ == "__main__":
    main()
