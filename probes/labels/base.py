"""The labeler interface and its registry.

A labeler turns a batch of generated images into per-pixel pseudo-labels at image resolution.
Labelers are looked up by name (timm-style registry) so that a YAML config can name one and
pass it keyword arguments, and so that the label cache can key its files on (name, arguments).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.common.hashing import sha256_json
from probes.common.registry import Registry
from probes.metrics.image_scores import DEPTH_SPACES


@dataclass(frozen=True)
class Missing:
    """A prerequisite that is not on this machine, and how to get it.

    The pre-flight check (``probes.cli.preflight``) collects these from every stage before any
    compute, so that an offline user learns everything that is missing at once instead of one
    item per failed run.

    :param what: what is missing and where it was looked for, e.g. ``"MiDaS weights Intel/dpt-large
        (data.labels.depth): not in the Hugging Face cache /x/hub"``.
    :param fix: the exact command or config key that provides it.
    :param url: where the code would fetch it by itself on first use; ``None`` if it never
        downloads it (then it is missing even with network access).
    """

    what: str
    fix: str
    url: str | None = None


class Labeler(ABC):
    """Maps ``uint8`` RGB images ``[B, H, W, 3]`` to float32 label maps ``[B, H, W]``.

    Subclasses set ``name`` (registry key) and ``version`` (bump it when outputs change, so that
    cached labels are recomputed rather than silently reused). Heavy models are loaded lazily in
    :meth:`load`, never in ``__init__``, so that building a config never downloads weights.
    """

    name: str = ""
    version: str = "1"
    #: how many images a call should receive; the cache runner batches accordingly
    batch_size: int = 8
    #: what a depth label *is* when its zero means something: ``depth`` (zero at the camera) or
    #: ``inverse_depth`` (zero infinitely far, MiDaS' raw disparity); None for labels defined only up to
    #: an affine map (e.g. per-image z-scored). Aligned depth metrics (AbsRel, RMSE, δ<1.25) need it; a
    #: config can set it per labeler (``data.labels.depth.space``), e.g. for files of exact depth.
    space: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        space = kwargs.get("space", type(self).space)
        if space not in (None, *DEPTH_SPACES):
            raise ValueError(f"data.labels.<task>.space must be one of {DEPTH_SPACES} (what the raw label is: depth "
                             f"with zero at the camera, or inverse depth with zero infinitely far) or null; got "
                             f"{space!r}")
        self.space = space
        self.kwargs = kwargs

    def load(self, device: str = "cpu") -> None:  # noqa: B027 (an optional hook, not abstract)
        """Load weights / move to ``device``. Called once before the first ``__call__``."""

    def bind(self, store: Any) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Called by the label cache with the store (an ``ActivationStore``) before labelling it.

        For labelers that label by the record rather than the pixels (the toy world's exact labels
        read which scene each store index holds from the store's manifest). The default: nothing.
        """

    def prerequisites(self, key: str) -> list[Missing]:
        """What :meth:`load` needs that is not on this machine (weights, packages), without loading it.

        Called by the pre-flight check before any compute, so a missing checkpoint is reported
        with everything else that is missing rather than after hours of generation. Must be cheap
        and must not download. ``key`` is this labeler's config key (``data.labels.<task>``), for
        fixes that name an option. The default: nothing needed (classical labelers).
        """
        return []

    @abstractmethod
    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        """Label ``images`` (uint8 ``[B, H, W, 3]``, RGB); return float32 ``[B, H, W]``.

        ``indices`` are the store indices of the images, for labelers that read labels from disk.
        """

    def fingerprint(self) -> str:
        """Stable id of this labeler's outputs: cached labels are stored under it."""
        payload = {"name": self.name, "version": self.version, "kwargs": self.cache_kwargs()}
        return f"{self.name}-{sha256_json(payload, 10)}"

    def cache_kwargs(self) -> dict[str, Any]:
        """Arguments that change the labels (device, batch size and the like do not)."""
        return {k: v for k, v in self.kwargs.items() if k not in {"device", "batch_size", "space"}}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kwargs": self.cache_kwargs()}


#: the labelers by name (``@register_labeler("name")`` adds one)
LABELERS: Registry[type[Labeler]] = Registry(
    "labeler", how_to_add="A labeler of your own: decorate it with @register_labeler(\"<name>\") and pass its "
                          "module or file with --import")


def register_labeler(name: str) -> Callable[[type[Labeler]], type[Labeler]]:
    """Class decorator: make a labeler available to configs under ``name``."""

    def wrap(cls: type[Labeler]) -> type[Labeler]:
        cls.name = name
        return LABELERS.register(name, cls)

    return wrap


def list_labelers(pattern: str = "*") -> list[str]:
    return LABELERS.list(pattern)


def check_labeler(name: str) -> None:
    """Fail on an unknown labeler name, listing the registered ones and how to add one."""
    LABELERS.check(name)


def build_labeler(name: str, **kwargs: Any) -> Labeler:
    """Instantiate the labeler registered as ``name``; unknown names list the valid ones."""
    return LABELERS.get(name)(**kwargs)
