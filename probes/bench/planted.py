"""Planted-signal data: an activation store built by hand, with activations and labels you choose.

For checking probe code: when the label is a known function of one head's activations, a correct
probe must find it there and nowhere else. The benchmark compares SGD and ridge probes on it
(``make bench``) and the tests check the probe modules with it; it lives with the benchmark, not
in ``training/``, because no run of the pipeline uses it. The manifest carries the request
fingerprint the data module computes from its config, so ``ActivationDataModule`` opens it as a
finished store and never generates.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from probes.common.files import atomic_write, atomic_write_text
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec, load_prompts
from probes.store.activations import ActivationStore
from probes.store.manifest import request_fingerprint, store_request
from probes.training.datamodule import ActivationDataModule


def synthetic_datamodule(root: Path, n: int, layers: list[LayerInfo], steps: int, size: int,
                         acts_fn: Callable[[np.random.Generator, LayerInfo], np.ndarray],
                         label_fns: dict[str, Callable[[dict[str, np.ndarray], np.random.Generator], np.ndarray]],
                         seed: int = 0, batch_size: int = 4) -> ActivationDataModule:
    """``acts_fn(rng, layer) -> [steps, tokens, channels]``; ``label_fns[task](acts, rng) -> [size, size]``."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    atomic_write_text(prompts, "\n".join(f"synthetic {i}" for i in range(n)))
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
            with atomic_write(label_dir / task / f"{i:06d}.npy", "wb") as f:
                np.save(f, fn({k: v.astype(np.float32) for k, v in acts.items()}, rng).astype(np.float32))
        store.write_batch([i], np.zeros((1, size, size, 3), np.uint8), {k: v[None, :, None] for k, v in acts.items()},
                          [{}])
    labels = {t: {"name": "files", "root": str(label_dir / t), "pattern": "{index:06d}.npy"} for t in label_fns}
    return ActivationDataModule(diffusion=diffusion, prompts=pspec, generation=gen, capture=cap, labels=labels,
                                store_dir=str(store_dir), batch_size=batch_size, device="cpu", progress=False)


def upsample_tokens(tok: np.ndarray, grid: tuple[int, int], size: int) -> np.ndarray:
    """Token values [T] -> [size, size] nearest upsampled map."""
    h, w = grid
    return np.kron(tok.reshape(h, w), np.ones((size // h, size // w)))


def planted_datamodule(root: Path, n: int = 48, size: int = 16, noise: float = 0.05,
                       seed: int = 0) -> ActivationDataModule:
    """Two layers x two steps; depth and foreground are linear in layer ``up3.0`` at step 1 only,
    shading is pure noise (nothing to find)."""
    a = LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=8, grid=(4, 4))
    b = LayerInfo("mid.0", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=6, grid=(2, 2))
    w_depth, w_fg = np.random.default_rng(seed + 10).normal(size=8), np.random.default_rng(seed + 11).normal(size=8)
    labels = {
        "depth": lambda x, rng: upsample_tokens(x["up3.0"][1] @ w_depth, a.grid, size) + noise * rng.normal(size=(size, size)),
        "foreground": lambda x, rng: upsample_tokens((x["up3.0"][1] @ w_fg > 0).astype(float), a.grid, size),
        "shading": lambda x, rng: rng.normal(size=(size, size)),
    }
    return synthetic_datamodule(root, n=n, layers=[a, b], steps=2, size=size,
                                acts_fn=lambda rng, layer: rng.normal(size=(2, layer.tokens, layer.channels)),
                                label_fns=labels, seed=seed)
