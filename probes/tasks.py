"""Probing tasks: what a label means and how a probe is trained and scored on it.

A registry (timm-style) so a new property (e.g. surface normals, a segmentation class) is one
``register_task`` call away. Built-in tasks follow the protocol: foreground is a 2-logit
per-pixel classification scored by Dice; depth and shading are regressions on z-scored
targets (statistics of the train split) with a Huber loss, scored by Spearman, Pearson and RMSE.
How a regression target is z-scored can be changed per run (:func:`check_target_norm`): the 2024
replication z-scored shading with depth's fixed constants.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from probes.common.registry import Registry


@dataclass(frozen=True)
class Task:
    """:param kind: ``binary`` (label > threshold is the positive class) or ``regression``.
    :param metrics: metrics reported per image and averaged; the first is the headline one.
    :param lr: the protocol's learning rate for this task's probes.
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    lr: float = 1e-3

    @property
    def out_dim(self) -> int:
        return 2 if self.kind == "binary" else 1

    @property
    def primary(self) -> str:
        return self.metrics[0]


#: the tasks by name (``register_task`` adds one; a misspelt name lists the valid ones)
TASKS: Registry[Task] = Registry("task", how_to_add="Add one with probes.tasks.register_task")


def register_task(task: Task) -> Task:
    if task.kind not in {"binary", "regression"}:
        raise ValueError(f"task kind must be 'binary' or 'regression', got {task.kind!r}")
    return TASKS.register(task.name, task)


def get_task(name: str) -> Task:
    return TASKS.get(name)


register_task(Task("foreground", "binary", ("dice",), lr=1e-3))
register_task(Task("depth", "regression", ("spearman", "pearson", "rmse"), lr=1e-3))
register_task(Task("shading", "regression", ("spearman", "pearson", "rmse"), lr=1e-2))

#: metrics where lower is better: the one place that says which way a metric points
LOWER_IS_BETTER = frozenset({"rmse", "loss"})


def better(metric: str, a: float, b: float) -> bool:
    """Whether score ``a`` beats ``b`` on ``metric``."""
    return a < b if metric in LOWER_IS_BETTER else a > b


#: the reference's fixed depth z-score constants (MiDaS DPT-Large inverse depth over its data set),
#: which the 2024 replication also used for shading
REFERENCE_DEPTH_NORM = {"mean": 15.740597, "std": 9.281932}


def check_target_norm(norm: Mapping[str, Any] | None, tasks: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Validate per-task z-score rules; returns them as plain data.

    A rule is ``train`` (the default: mean and std of the task's own labels on the train split),
    the name of another regression task of the run (reuse *its* train statistics), or fixed
    constants ``{mean: m, std: s}`` (e.g. the reference's depth constants). Checked when the
    config is read, before any compute.
    """
    out: dict[str, Any] = {}
    for task, rule in dict(norm or {}).items():
        where = f"data.target_norm.{task}"
        if task not in tasks or get_task(task).kind != "regression":
            raise ValueError(f"{where}: {task!r} is not a regression task of this run ({', '.join(tasks)}); only "
                             f"regression targets are z-scored")
        if isinstance(rule, str):
            if rule != "train" and (rule not in tasks or get_task(rule).kind != "regression" or rule == task):
                raise ValueError(f"{where}: {rule!r} is neither 'train' nor another regression task of this run "
                                 f"({', '.join(t for t in tasks if t != task)}); or give {{mean: m, std: s}}")
            out[task] = rule
        elif isinstance(rule, Mapping) and set(rule) == {"mean", "std"}:
            mean, std = rule["mean"], rule["std"]
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
                     for v in (mean, std))
            if not ok or std <= 0:
                raise ValueError(f"{where}: mean and std must be finite numbers and std > 0, got {dict(rule)!r}")
            out[task] = {"mean": float(mean), "std": float(std)}
        else:
            raise ValueError(f"{where} must be 'train', the name of another regression task, or "
                             f"{{mean: m, std: s}}; got {rule!r}")
    return out


def resolve_target_stats(measured: Mapping[str, Mapping[str, float]],
                         norm: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The z-score each regression task trains with: ``measured`` (train-split statistics per task)
    with the rules of :func:`check_target_norm` applied. A task-name rule whose task is not
    measured yet is left out (one-pass probes measure on the train stream and resolve again)."""
    out = {t: dict(v) for t, v in measured.items()}
    for task, rule in (norm or {}).items():
        if isinstance(rule, Mapping):
            out[task] = {"mean": float(rule["mean"]), "std": float(rule["std"])}
        elif rule != "train":
            if rule in measured:
                out[task] = dict(measured[rule])
            else:
                out.pop(task, None)
    return out
