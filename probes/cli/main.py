"""``diffusion-probes <command>``: one console command for every stage, tool and experiment.

``fit`` (and ``validate``/``test``/``predict``) is ``train.py``'s LightningCLI; every other command
is a typed function read with the same convention (:mod:`probes.cli.convention`): ``--config
FILE.yaml`` (several stack), ``--print_config``, any key overridden on the command line, config
files composed with ``defaults:``, and ``--import MODULE_OR_FILE`` for user labelers, tasks and
layers. The table below is the one list of commands; each names the callable it runs.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from probes.cli.convention import run_typed
from probes.cli.errors import DEBUG_ENV, DEBUG_FLAG, UsageError, guarded, unknown_command
from probes.cli.train import TRAIN_COMMANDS, train_main


@dataclass(frozen=True)
class Command:
    """A subcommand: what it does, and the callable(s) it runs (``module:attribute``; a mapping of
    sub-subcommands for tools with several verbs)."""

    help: str
    target: str | dict[str, str]
    then: str | None = None          # a config class's target is instantiated and handed to this callable
    plugins: bool = True             # import user plug-ins first (commands that read configs)
    argv: str | None = None          # a function rewriting argv first (``report RUN RUN ...``)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


COMMANDS: dict[str, Command] = {
    "evaluate": Command("test exported probes on a store                   (= python evaluate.py ...)",
                        "probes.cli.evaluate:evaluate"),
    "report": Command("compare finished runs in a report of their own", "probes.cli.evaluate:report",
                      argv="probes.cli.evaluate:report_args"),
    "intervene": Command("edit activations with exported probes, score the edited images (causal test)",
                         "probes.experiments.intervention.config:InterventionConfig",
                         then="probes.experiments.intervention.run:intervene"),
    "lens": Command("semantic lens: which denoiser layer keeps object meaning (configs/lens/*.yaml)",
                    "probes.experiments.lens.run:lens"),
    "layers": Command("list a model's probe layers (--model <family, Hub id, folder or architecture>)",
                      "probes.cli.layers:layers", plugins=False),
    "sizes": Command("store size per image of each family's real models at native resolution",
                     "probes.cli.layers:sizes", plugins=False),
    "demo": Command("the toy world's trained model vs its three controls, beyond position (make demo)",
                    "probes.cli.demo:demo", plugins=False),
    "bench": Command("measure speed and rewrite BENCHMARKS.md (make bench)", "probes.bench.run:bench", plugins=False),
    "classify": Command("per-step classifier scores of saved decoded images (.npy)",
                        "probes.experiments.classify.run:classify_saved", plugins=False),
    "class-prompts": Command("write a class-labelled prompt set (imagenet | toy)",
                             {"imagenet": "probes.experiments.classify.imagenet:imagenet_prompt_set",
                              "toy": "probes.experiments.classify.prompt_sets:toy_class_prompt_set"}, plugins=False),
    "toy-quality": Command("sample-quality bars (shape, colour, left/right) of the toy model and its control",
                           "probes.experiments.toy.quality_run:toy_quality", plugins=False),
    "toy-prompts": Command("write captions of fresh toy-world scenes as a prompt set",
                           "probes.toy.prompts:toy_prompt_set", plugins=False),
    "toy-labelers": Command("train (or score) the toy world's labelers (train | eval; make toy-model)",
                            {"train": "probes.recipes.toy_labelers.train:train_command",
                             "eval": "probes.recipes.toy_labelers.train:evaluate_command"}, plugins=False),
    "toy-model": Command("train the toy world's diffusion model (make toy-model; resumable)",
                         "probes.recipes.toy_model.recipe:toy_model", plugins=False),
}

USAGE = ("usage: diffusion-probes {" + ",".join(["fit", *COMMANDS]) + "} [options]\n\n"
         "  fit            train every probe, then test and write outputs    (= python train.py fit ...)\n"
         + "".join(f"  {name:<14} {c.help}\n" for name, c in COMMANDS.items())
         + "  each takes --help, --config FILE.yaml, --print_config, and key overrides (--key value)\n"
         + f"  a mistake prints one line; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows its traceback\n")


def run_command(name: str, argv: Sequence[str] | None = None) -> Any:
    """Run the subcommand ``name`` of :data:`COMMANDS` on ``argv`` (the options after its name)."""
    c = COMMANDS[name]
    argv = list(sys.argv[2:] if argv is None else argv)
    if c.argv:
        argv = _load(c.argv)(argv)
    target = {k: _load(v) for k, v in c.target.items()} if isinstance(c.target, dict) else _load(c.target)
    then: Callable[[Any], Any] | None = _load(c.then) if c.then else None
    return run_typed(target, argv, then=then, plugins=c.plugins, prog=f"diffusion-probes {name}")


def evaluate_main(argv: Sequence[str] | None = None) -> Any:
    """``evaluate.py``."""
    return guarded(lambda rest: run_command("evaluate", rest), sys.argv[1:] if argv is None else argv, "evaluate.py")


def main(argv: Sequence[str] | None = None) -> None:
    """``diffusion-probes <command> ...``: a user's mistake exits with its one-line explanation
    (:mod:`probes.cli.errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "diffusion-probes" + (f" {argv[0]}" if argv and argv[0] in (*TRAIN_COMMANDS, *COMMANDS) else "")
    guarded(_dispatch, argv, prog)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd in TRAIN_COMMANDS:
        train_main([cmd, *rest])
    elif cmd in COMMANDS:
        run_command(cmd, rest)
    else:
        raise UsageError(unknown_command(cmd, [*TRAIN_COMMANDS, *COMMANDS]))


if __name__ == "__main__":
    main()
