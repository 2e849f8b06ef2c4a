"""Load any family's pipeline with ``from_pretrained``: Hub id or local folder, same options as SD v1.4.

The family's stock pipeline class does the loading (``DiffusionPipeline`` would pick the class
from ``model_index.json`` too, but naming it lets a config say which family it expects and fail
early when a folder holds another). Options are :class:`probes.diffusion.loading.DiffusionSpec`'s:
revision, variant, dtype, cache folder, ``local_files_only`` (implied by ``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from probes.common.env import offline
from probes.diffusion.families.spec import Family, family_of_pipeline_class, get_family


def family_of_folder(folder: str | Path) -> Family:
    """The family of a local pipeline folder, from its ``model_index.json`` (and, for
    ``StableDiffusionPipeline``, its U-Net's config)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    class_name = json.loads(index.read_text())["_class_name"]
    unet_cfg = folder / "unet" / "config.json"
    return family_of_pipeline_class(class_name, json.loads(unet_cfg.read_text()) if unet_cfg.exists() else None)


def load_family_pipeline(model: str | Path, family: Family | str | None = None, dtype: torch.dtype = torch.float32,
                         revision: str | None = None, variant: str | None = None, cache_dir: str | None = None,
                         local_files_only: bool = False, device: torch.device | str = "cpu"):
    """``<family's pipeline class>.from_pretrained`` with the project's loading options.

    ``family`` is read from a local folder when not given (a Hub id needs it: configs/<family>/
    say it). A folder whose pipeline is of another family than the one asked for is refused.
    U-Net families get SDPA attention processors (``AttnProcessor2_0``), on whose ``to_out.0`` the
    self-attention hooks fire; the transformers keep their own processors (the hooks sit on blocks
    and attention modules, which every processor runs).
    """
    import diffusers

    path = Path(model).expanduser()
    if family is None:
        if not path.is_dir():
            raise ValueError(f"model {str(model)!r} is not a local folder: say its family ({', '.join(_names())})")
        family = family_of_folder(path)
    family = get_family(family) if isinstance(family, str) else family
    if path.is_dir():
        found = family_of_folder(path)
        if found.pipeline != family.pipeline:
            raise ValueError(f"{path} holds a {found.name} pipeline ({found.pipeline}), not {family.name} "
                             f"({family.pipeline})")
    kwargs: dict[str, Any] = dict(torch_dtype=dtype, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only or offline(), **family.load_kwargs)
    if variant:
        kwargs["variant"] = variant
    cls = getattr(diffusers, family.pipeline)
    pipe = cls.from_pretrained(str(path) if path.is_dir() else str(model), **kwargs)
    if family.is_unet:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _names() -> list[str]:
    from probes.diffusion.families.spec import FAMILIES

    return list(FAMILIES)
