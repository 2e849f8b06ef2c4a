"""What the data side hands the probe side: light, frozen, importable without Lightning or labelers.

``ProbeSpec`` describes the captured activations (layers, steps, timesteps, label size, target
statistics). It crosses stage boundaries, so it is immutable: a stage that needs other values
builds a new spec (``dataclasses.replace``) instead of writing into one another stage holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from probes.diffusion.layers import LayerInfo


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in (d or {}).items()})


def _thawed(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _thawed(v) if isinstance(v, Mapping) else v for k, v in d.items()}


@dataclass(frozen=True)
class ProbeSpec:
    """Everything the probes need to know about the data.

    :param target_stats: per regression task, ``{"mean", "std"}`` of the raw labels on the train
        split (the z-score the probes train on and the export records).
    :param target_norm: per task, a rule that overrides those statistics (``probes.tasks.
        check_target_norm``: another task's statistics, or fixed constants); kept so that
        statistics measured later (one-pass probes) follow it too.
    :param label_spaces: per task whose raw labels are a depth with a meaningful zero, what they are
        (``depth`` or ``inverse_depth``, the labeler's ``space``): aligned depth metrics (AbsRel,
        RMSE, δ<1.25) are computed for it. Absent for labels defined only up to an affine map.
    """

    layers: tuple[LayerInfo, ...]
    steps: tuple[int, ...]
    timesteps: tuple[float, ...]
    tasks: tuple[str, ...]
    label_size: tuple[int, int]
    target_stats: Mapping[str, Mapping[str, float]]
    model: Mapping[str, Any]
    is_random: bool
    store_dir: str
    data_config: Mapping[str, Any] = field(default_factory=dict)
    streaming: bool = False
    target_norm: Mapping[str, Any] = field(default_factory=dict)
    label_spaces: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "timesteps", "tasks", "label_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("target_stats", "model", "data_config", "target_norm", "label_spaces"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def with_target_stats(self, stats: Mapping[str, Mapping[str, float]]) -> ProbeSpec:
        """A copy whose statistics are ``stats`` merged over these (one-pass probes measure their own),
        with this spec's ``target_norm`` rules applied to the result."""
        from probes.tasks import resolve_target_stats

        merged = {**_thawed(self.target_stats), **_thawed(stats)}
        return replace(self, target_stats=resolve_target_stats(merged, _thawed(self.target_norm)))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers], "steps": list(self.steps),
                "timesteps": list(self.timesteps), "tasks": list(self.tasks), "label_size": list(self.label_size),
                "target_stats": _thawed(self.target_stats), "model": _thawed(self.model),
                "is_random": self.is_random, "store_dir": self.store_dir,
                "data_config": _thawed(self.data_config), "streaming": self.streaming,
                "target_norm": _thawed(self.target_norm), "label_spaces": _thawed(self.label_spaces)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeSpec:
        d = dict(d)
        d["layers"] = [LayerInfo.from_dict(x) for x in d["layers"]]
        return cls(**d)
