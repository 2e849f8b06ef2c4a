"""The disk a run will still write, estimated before any compute: the store *and* its label caches.

The store checks its own size when it is created, and each label cache checks its own when it is
created, hours later. A disk with room for the store but not for the labels passed the first
check, generated everything, and was refused while labelling. This module adds up everything a
run will write (activations and images not yet generated, labels not yet computed, decoded
intermediate images and their labels) so that the data module and the pre-flight check refuse up front.

The activation layout comes from the denoiser's *config* (a U-Net or transformer of the model's
family built on the meta device: no weights, no memory), so it is known before the model is loaded.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from probes.diffusion.families.spec import get_family, native_side
from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import DiffusionSpec, load_architecture, local_model_dir
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptRecord
from probes.store.activations import ActivationStore, InsufficientDisk, decoded_latent, human_bytes
from probes.store.manifest import capture_section, inputs_section, resolve_capture


def denoiser_config(diffusion: DiffusionSpec) -> tuple[dict[str, Any], int] | None:
    """``(denoiser config, VAE scale factor)`` without loading weights: from the random architecture,
    the local folder or the cached Hub snapshot, else (a Hub id not downloaded yet) the layer-fixing
    fields :mod:`probes.diffusion.families.sizes` keeps for the real models; None when none has it."""
    family = get_family(diffusion.family_name)
    if diffusion.is_random:
        arch = load_architecture(diffusion.architecture)
        if "components" in arch:                         # a family's tiny architecture
            comps = arch["components"]
            return dict(comps[family.denoiser]["config"]), 2 ** (len(comps["vae"]["config"]["block_out_channels"]) - 1)
        return dict(arch["unet"]), 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    try:
        import diffusers

        kw = dict(revision=diffusion.revision, cache_dir=diffusion.cache_dir, local_files_only=True)
        model_id = str(local_model_dir(diffusion.model_id) or diffusion.model_id)
        den = getattr(diffusers, family.denoiser_class).load_config(model_id, subfolder=family.denoiser, **kw)
        vae = diffusers.AutoencoderKL.load_config(model_id, subfolder="vae", **kw)
    except Exception:  # not cached yet: the pre-flight check reports the missing weights
        from probes.diffusion.families.sizes import real_models

        entry = real_models().get(diffusion.model_id)
        if entry is None or entry["family"] != family.name:
            return None
        return dict(entry["denoiser"]["config"]), int(entry["vae_scale_factor"])
    return dict(den), 2 ** (len(vae["block_out_channels"]) - 1)


def vae_config(diffusion: DiffusionSpec) -> dict[str, Any] | None:
    """The VAE's config without loading weights (for ``vae.mid``'s channels); None when not cached."""
    if diffusion.is_random:
        arch = load_architecture(diffusion.architecture)
        return dict(arch["components"]["vae"]["config"] if "components" in arch else arch["vae"])
    try:
        from diffusers import AutoencoderKL

        return dict(AutoencoderKL.load_config(diffusion.model_id, subfolder="vae", revision=diffusion.revision,
                                              cache_dir=diffusion.cache_dir, local_files_only=True))
    except Exception:
        return None


def planned_registry(diffusion: DiffusionSpec, height: int | None = None, width: int | None = None,
                     kinds: Iterable[str] | None = None) -> tuple[LayerRegistry, tuple[int, int]] | None:
    """The model's layers at ``height`` x ``width`` (default: its native size) and that size, from its
    denoiser's config on the meta device (:func:`denoiser_config`); None when the config is unknown."""
    import diffusers
    import torch

    from probes.diffusion.families.layers import denoiser_registry, latent_hw

    found = denoiser_config(diffusion)
    if found is None:
        return None
    family = get_family(diffusion.family_name)
    cfg, f = found
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    native = native_side(family, cfg, f)
    h, w = height or native, width or native
    with torch.device("meta"):
        denoiser = getattr(diffusers, family.denoiser_class).from_config(cfg)
    return denoiser_registry(family, denoiser, latent_hw(family, f, h, w), kinds), (h, w)


def planned_layout(diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                   num_samples: int, store_activations: bool = True) -> dict[str, Any] | None:
    """The part of a store manifest that fixes its size (what ``ActivationStore.layout`` reads), or None."""
    from probes.diffusion.families.layers import latent_hw
    from probes.diffusion.layers import vae_mid_layer

    planned = planned_registry(diffusion, generation.height, generation.width)
    if planned is None:
        return None
    registry, (h, w) = planned
    family = get_family(diffusion.family_name)
    cfg, f = denoiser_config(diffusion)
    hw = latent_hw(family, f, h, w)
    vae = vae_config(diffusion) if family.is_unet and any(str(p).startswith("vae") for p in capture.layers) else None
    if vae is not None and vae.get("mid_block_add_attention", True):   # vae.mid: the decoder's mid-block width
        registry.register(vae_mid_layer(int(vae["block_out_channels"][-1]), hw))
    layers, steps = resolve_capture(registry, capture, generation)
    inputs = inputs_section(int(cfg.get("in_channels", 4)), (h // f, w // f), generation.guidance_scale > 1, 77,
                            int(cfg.get("cross_attention_dim", 768))) if capture.record_inputs else None
    return {"num_samples": num_samples, "generation": dict(asdict(generation), height=h, width=w),
            "capture": capture_section(layers, steps, capture, store_activations, family=family, inputs=inputs)}


def _row_bytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize


def store_bytes(layout: dict[str, Any], todo: Sequence[int], test: Sequence[int]) -> int:
    """Bytes the samples ``todo`` add to a store of ``layout`` (decoded intermediate images: test samples only)."""
    todo_set, total = set(todo), 0
    test_rows = len(todo_set & set(test))
    decoded = f"{decoded_latent(layout['generation'])}_images"
    for name, (shape, dtype) in ActivationStore.layout(layout).items():
        total += _row_bytes(shape, dtype) * (test_rows if name == decoded else len(todo_set))
    return total


def free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_budget(needs: list[tuple[str, int]], path: Path) -> None:
    """Refuse when ``needs`` (``(what, bytes)``) do not fit on the disk holding ``path``."""
    total = sum(b for _, b in needs)
    free = free_bytes(path)
    if total > free:
        parts = ", ".join(f"{what} {human_bytes(b)}" for what, b in needs if b)
        raise InsufficientDisk(
            f"this run still writes {human_bytes(total)} at {path} ({parts}) but only {human_bytes(free)} is free. "
            f"Capture fewer layers/steps (data.capture.layers / data.capture.steps), use data.mode=streaming "
            f"(no activation cache), or point data.store_root at a bigger disk.")


def label_bytes(num_rows: int, height: int, width: int, per_row: int = 1) -> int:
    """float32 label maps: ``num_rows`` samples of ``per_row`` maps each."""
    return num_rows * per_row * height * width * 4


def records_split(records: Sequence[PromptRecord], split: str) -> list[int]:
    return [r.index for r in records if r.split == split]
