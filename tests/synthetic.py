"""Build an activation store by hand (no diffusion model) with activations and labels the test chooses.

The manifest carries the same request fingerprint the data module computes from its config, so
``ActivationDataModule`` opens it as a finished store and never generates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from data.datamodule import ActivationDataModule, request_fingerprint, store_request
from data.generation import CaptureSpec, GenerationSpec
from data.layers import LayerInfo
from data.models import DiffusionSpec
from data.prompts import PromptSpec, load_prompts
from data.store import ActivationStore


def synthetic_datamodule(root: Path, n: int, layers: list[LayerInfo], steps: int, size: int,
                         acts_fn: Callable[[np.random.Generator, LayerInfo], np.ndarray],
                         label_fns: dict[str, Callable[[dict[str, np.ndarray], np.random.Generator], np.ndarray]],
                         seed: int = 0, batch_size: int = 4) -> ActivationDataModule:
    """``acts_fn(rng, layer) -> [steps, tokens, channels]``; ``label_fns[task](acts, rng) -> [size, size]``."""
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"synthetic {i}" for i in range(n)))
    pspec = PromptSpec(source=str(prompts), val_fraction=0.15, test_fraction=0.25)
    records = load_prompts(pspec)
    diffusion = DiffusionSpec(source="random", architecture="tiny")
    gen = GenerationSpec(steps=steps, height=size, width=size, batch_size=batch_size)
    cap = CaptureSpec(layers=[l.name for l in layers])
    request = store_request(diffusion, gen, cap, records)
    timesteps = list(np.linspace(999, 0, steps).astype(float))
    manifest = {
        "fingerprint": request_fingerprint(request), "request": request, "code_version": "test",
        "model": dict(diffusion.identity(), is_random=True),
        "generation": dict(height=size, width=size, steps=steps),
        "capture": {"layers": [l.to_dict() for l in layers], "steps": list(range(steps)), "timesteps": timesteps,
                    "all_timesteps": timesteps, "halves": ["cond"], "dtype": "float16"},
        "num_samples": n, "prompts": [],
    }
    store_dir, label_dir = root / "store", root / "labels"
    store = ActivationStore.create(store_dir, manifest)
    rng = np.random.default_rng(seed)
    for i in range(n):
        acts = {l.name: acts_fn(rng, l).astype(np.float16) for l in layers}
        for task, fn in label_fns.items():
            (label_dir / task).mkdir(parents=True, exist_ok=True)
            np.save(label_dir / task / f"{i:06d}.npy", fn({k: v.astype(np.float32) for k, v in acts.items()}, rng)
                    .astype(np.float32))
        store.write_batch([i], np.zeros((1, size, size, 3), np.uint8), {k: v[None, :, None] for k, v in acts.items()},
                          [{}])
    labels = {t: {"name": "files", "root": str(label_dir / t), "pattern": "{index:06d}.npy"} for t in label_fns}
    return ActivationDataModule(diffusion=diffusion, prompts=pspec, generation=gen, capture=cap, labels=labels,
                                store_dir=str(store_dir), batch_size=batch_size, device="cpu", progress=False)


def upsample_tokens(tok: np.ndarray, grid: tuple[int, int], size: int) -> np.ndarray:
    """Token values [T] -> [size, size] nearest upsampled map."""
    h, w = grid
    return np.kron(tok.reshape(h, w), np.ones((size // h, size // w)))
