"""Load any family's pipeline with ``from_pretrained``: Hub id or local folder, same options as SD v1.4.

The family's stock pipeline class does the loading (``DiffusionPipeline`` would pick the class
from ``model_index.json`` too, but naming it lets a config say which family it expects and fail
early when a folder, or a cached Hub snapshot, holds another). Options are
:class:`probes.diffusion.loading.DiffusionSpec`'s: revision, variant, dtype, cache folder,
``local_files_only`` (implied by ``HF_HUB_OFFLINE=1``). :func:`probes.diffusion.loading.load_pipeline`
does the rest (tokenisation, the permuted control, attention processors, device, precision).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from probes.common.env import offline
from probes.common.hub import cached_snapshot
from probes.diffusion.families.spec import FAMILIES, Family, family_of_pipeline_class, get_family


class FamilyMismatch(ValueError):
    """A pipeline folder (or cached snapshot) holds another family than the config says."""


def family_of_index(index: dict[str, Any], unet_config: dict[str, Any] | None) -> Family:
    """The family of a pipeline from its ``model_index.json`` (and, for ``StableDiffusionPipeline``,
    its U-Net's config)."""
    return family_of_pipeline_class(index["_class_name"], unet_config)


def family_of_folder(folder: str | Path) -> Family:
    """The family of a local pipeline folder, from its ``model_index.json`` (and, for
    ``StableDiffusionPipeline``, its U-Net's config)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    unet_cfg = folder / "unet" / "config.json"
    return family_of_index(json.loads(index.read_text()),
                           json.loads(unet_cfg.read_text()) if unet_cfg.exists() else None)


def _check_family(found: Family, family: Family, where: str) -> None:
    if found.pipeline != family.pipeline:
        raise FamilyMismatch(f"{where} holds a {found.name} pipeline ({found.pipeline}), not {family.name} "
                             f"({family.pipeline}): set data.diffusion.family={found.name}")


def load_family_pipeline(model: str | Path, family: Family | str | None = None, dtype: torch.dtype = torch.float32,
                         revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
                         local_files_only: bool = False):
    """``<family's pipeline class>.from_pretrained`` with the project's loading options (on the CPU,
    progress bar off).

    ``family`` is read from a local folder when not given (a Hub id needs it: configs/<family>/
    say it). A folder, or a cached Hub snapshot, whose pipeline is of another family than the one
    asked for is refused before any weight is read.
    """
    import diffusers

    path = Path(model).expanduser()
    if family is None:
        if not path.is_dir():
            raise ValueError(f"model {str(model)!r} is not a local folder: say its family ({', '.join(FAMILIES)})")
        family = family_of_folder(path)
    family = get_family(family) if isinstance(family, str) else family
    if path.is_dir():
        _check_family(family_of_folder(path), family, str(path))
    else:
        snap = cached_snapshot(str(model), "model_index.json", cache_dir, revision)
        if snap is not None:
            unet_cfg = snap / "unet" / "config.json"
            _check_family(family_of_index(json.loads((snap / "model_index.json").read_text()),
                                          json.loads(unet_cfg.read_text()) if unet_cfg.is_file() else None),
                          family, f"the cached snapshot of {model}")
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only or offline(), **family.load_kwargs)
    if variant:
        kwargs["variant"] = variant
    cls = getattr(diffusers, family.pipeline)
    pipe = cls.from_pretrained(str(path) if path.is_dir() else str(model), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
