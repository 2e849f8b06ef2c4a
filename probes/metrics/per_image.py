"""One score per test image for every head and baseline of a run: what every interval is computed from.

A mean over 64 test images hides how much it would move on other images; the paired bootstrap
(:mod:`probes.metrics.bootstrap`) needs the per-image scores of both members of a difference, on the
same images. So a run keeps, next to ``metrics.csv``, the per-image test scores of

- every probe head (``probe``: ``[M, L, S, N]``, metrics x layers x steps x images),
- every activation+prior head (``with_prior``: same shape), the heads the gain is measured with,
- the position baselines (``prior``, ``plane``: ``[M, N]``), the labeler on decoded images
  (``decoded``: ``[M, S, N]``),
- the aligned depth metrics of the best heads (``aligned/<what>``: ``[3, N]`` AbsRel, RMSE, δ<1.25),

keyed ``<task>/<what>``, with the test images' store indices, so two runs on the same prompts
(a model and its controls) are paired image by image. Written as one ``per_image.npz`` (numbers
only: loads without pickle).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probes.common.files import atomic_write

FILE = "per_image.npz"
ALIGNED_METRICS = ("abs_rel", "rmse", "delta1")


@dataclass
class PerImageScores:
    """Per-image test scores of one run (see the module docstring).

    :param index: ``[N]`` store indices of the test images, in the order of every array's last axis.
    :param metrics: per task, the metric names of the first axis (``task.metrics`` order).
    :param arrays: ``"<task>/<what>"`` -> array whose last axis is the image.
    :param info: JSON-able facts about the arrays (e.g. which head an ``aligned`` array belongs to).
    """

    index: np.ndarray
    layers: list[str]
    steps: list[int]
    metrics: dict[str, list[str]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        for key, a in self.arrays.items():
            if a.shape[-1] != self.index.size:
                raise ValueError(f"per-image array {key!r} has {a.shape[-1]} images, the index has {self.index.size}")

    def has(self, task: str, what: str) -> bool:
        return f"{task}/{what}" in self.arrays

    def _m(self, task: str, metric: str) -> int:
        names = self.metrics.get(task, [])
        if metric not in names:
            raise KeyError(f"task {task!r} has no per-image {metric!r} scores (it has {names})")
        return names.index(metric)

    def head(self, task: str, metric: str, layer: str, step: int, what: str = "probe") -> np.ndarray:
        """``[N]`` scores of a probe head (``what``: ``probe`` or ``with_prior``)."""
        a = self.arrays[f"{task}/{what}"]
        return a[self._m(task, metric), self.layers.index(layer), self.steps.index(step)]

    def baseline(self, task: str, metric: str, name: str) -> np.ndarray:
        """``[N]`` scores of a position baseline (``prior`` or ``plane``)."""
        return self.arrays[f"{task}/{name}"][self._m(task, metric)]

    def decoded(self, task: str, metric: str, step: int) -> np.ndarray:
        return self.arrays[f"{task}/decoded"][self._m(task, metric), self.steps.index(step)]

    def aligned(self, task: str, what: str) -> dict[str, np.ndarray] | None:
        """The aligned depth metrics ``{abs_rel, rmse, delta1}: [N]`` of ``what``, if kept."""
        a = self.arrays.get(f"{task}/aligned/{what}")
        return None if a is None else dict(zip(ALIGNED_METRICS, a))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": self.layers, "steps": [int(s) for s in self.steps], "metrics": self.metrics,
                "info": self.info}
        with atomic_write(path, "wb", encoding=None) as f:      # never a half-written file, never through a link
            np.savez_compressed(f, index=self.index, meta=np.array(json.dumps(meta)),
                                **{f"a:{k}": v for k, v in self.arrays.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PerImageScores:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("a:")}
            return cls(z["index"], meta["layers"], meta["steps"], meta["metrics"], arrays, meta.get("info", {}))


def align(a: PerImageScores, b: PerImageScores) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``a`` and in ``b`` of the test images both hold, in the same order (pairing two runs).

    Runs on the same prompt set share their test indices; a difference between them is paired
    image by image (for a control that generates its own images: prompt and seed by prompt and seed).
    """
    common, ia, ib = np.intersect1d(a.index, b.index, return_indices=True)
    if common.size == 0:
        raise ValueError("the two runs share no test image index: they cannot be paired (different prompt sets?)")
    return ia, ib
