"""Probing tasks: what a label means and how a probe is trained and scored on it.

A registry (timm-style) so a new property (e.g. surface normals, a segmentation class) is one
``register_task`` call away. Built-in tasks follow the protocol: foreground is a 2-logit
per-pixel classification scored by Dice; depth and shading are regressions on z-scored
targets (statistics of the train split) with a Huber loss, scored by Spearman, Pearson and RMSE.
"""
from __future__ import annotations

from dataclasses import dataclass

_TASKS: dict[str, Task] = {}


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


def register_task(task: Task) -> Task:
    if task.kind not in {"binary", "regression"}:
        raise ValueError(f"task kind must be 'binary' or 'regression', got {task.kind!r}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_TASKS))} "
                       f"(add one with probes.tasks.register_task)")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


register_task(Task("foreground", "binary", ("dice",), lr=1e-3))
register_task(Task("depth", "regression", ("spearman", "pearson", "rmse"), lr=1e-3))
register_task(Task("shading", "regression", ("spearman", "pearson", "rmse"), lr=1e-2))

#: metrics where lower is better: the one place that says which way a metric points
LOWER_IS_BETTER = frozenset({"rmse", "loss"})


def better(metric: str, a: float, b: float) -> bool:
    """Whether score ``a`` beats ``b`` on ``metric``."""
    return a < b if metric in LOWER_IS_BETTER else a > b
