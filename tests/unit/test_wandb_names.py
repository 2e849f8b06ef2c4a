"""W&B runs are named after their run folder, grouped per experiment, and a chained command's runs
share one wandb/ folder (issue 18): one `wandb sync` sends the demo."""
from __future__ import annotations

from jsonargparse import Namespace

from probes.cli.train import WANDB_DIR_ENV, WANDB_GROUP_ENV, wandb_defaults


def test_a_plain_run_is_named_after_its_folder_and_logs_into_it():
    args = Namespace(project="p", save_dir=".", name=None, group=None)
    wandb_defaults(args, "outputs/runs/demo-20261203-120000", environ={})
    assert args.name == "demo-20261203-120000" and args.save_dir == "outputs/runs/demo-20261203-120000"
    assert args.group is None


def test_a_chained_experiment_groups_its_runs_in_one_folder():
    env = {WANDB_GROUP_ENV: "demo-outputs-1", WANDB_DIR_ENV: "outputs/demo"}
    runs = [Namespace(project="p", save_dir=".", name=None, group=None) for _ in range(2)]
    for args, folder in zip(runs, ("model", "control_permuted_own_images")):
        wandb_defaults(args, f"outputs/demo/{folder}", environ=env)
    assert [a.name for a in runs] == ["model", "control_permuted_own_images"]
    assert {a.group for a in runs} == {"demo-outputs-1"} and {a.save_dir for a in runs} == {"outputs/demo"}


def test_what_the_config_says_wins():
    args = Namespace(project="p", save_dir="/mine", name="mine", group="g")
    wandb_defaults(args, "outputs/runs/x", environ={WANDB_GROUP_ENV: "other", WANDB_DIR_ENV: "elsewhere"})
    assert (args.name, args.group, args.save_dir) == ("mine", "g", "/mine")
