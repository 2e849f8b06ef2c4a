"""Trajectories: the denoiser's inputs at every captured step, for a batch of images.

A replay runs a U-Net once per captured step on exactly these inputs, so a source only has to say,
for a list of store indices, what the U-Net received: the latent model input ``x_t`` (after the
scheduler's input scaling), the timestep, and the text embeddings (unconditional and conditional
halves). :class:`StoreTrajectory` reads what a generation recorded; another protocol (e.g. render
→ VAE-encode → noise to each step's ``t``) is one more class with the same two members.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Trajectory:
    """The U-Net's inputs for ``indices`` at ``steps``.

    :param latents: ``[B, S, C, h, w]`` the latent model input of each step, in the dtype the U-Net got.
    :param timesteps: ``[S]`` each step's timestep, in the dtype the U-Net got.
    :param text: ``[B, halves, L, D]`` text embeddings (``halves`` 2: unconditional then conditional, the
        classifier-free-guidance order; 1: conditional only).
    """

    indices: list[int]
    steps: list[int]
    latents: Tensor
    timesteps: Tensor
    text: Tensor

    def __post_init__(self) -> None:
        b, s = len(self.indices), len(self.steps)
        if self.latents.shape[:2] != (b, s) or self.timesteps.shape != (s,) or self.text.shape[0] != b:
            raise ValueError(f"trajectory of {b} images x {s} steps: latents {tuple(self.latents.shape)}, timesteps "
                             f"{tuple(self.timesteps.shape)}, text {tuple(self.text.shape)} do not agree")


class TrajectorySource(Protocol):
    """Where a replay reads its inputs: the captured steps, and the inputs of any batch of indices."""

    steps: list[int]

    def batch(self, indices: Sequence[int]) -> Trajectory: ...


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a commit record of recorded inputs")
    return dtype


class StoreTrajectory:
    """The trajectory a generation recorded in a store (``data.capture.record_inputs: true``).

    Values are stored as float32 (exact for fp16 and fp32 inputs) and cast back to the dtypes each
    sample's commit record names, so the replayed U-Net receives bit-identical inputs.
    """

    def __init__(self, store) -> None:
        if not getattr(store, "inputs", None):
            raise ValueError(f"the store at {store.root} did not record the denoiser's inputs, so no U-Net can be "
                             f"replayed on its trajectory: generate it with data.capture.record_inputs: true "
                             f"(configs/capture/all.yaml sets it)")
        self.store = store
        self.steps = list(store.manifest["capture"]["steps"])
        self.timestep_values = list(store.manifest["capture"]["timesteps"])

    def batch(self, indices: Sequence[int]) -> Trajectory:
        idx = [int(i) for i in indices]
        missing = self.store.missing(idx)
        if missing:
            raise ValueError(f"samples {missing[:5]} of {self.store.root} are not generated yet: nothing to replay")
        recs = [self.store.commits.record(i).get("inputs") for i in idx]
        if any(r is None for r in recs):
            bad = [i for i, r in zip(idx, recs) if r is None]
            raise ValueError(f"samples {bad[:5]} of {self.store.root} were committed without recorded inputs")
        dtypes = recs[0]["dtypes"]
        if any(r["dtypes"] != dtypes or r["timesteps"] != recs[0]["timesteps"] for r in recs):
            raise ValueError(f"samples {idx} were recorded with different dtypes or timesteps: replay them apart")
        if not np.allclose(recs[0]["timesteps"], self.timestep_values, rtol=0, atol=0):
            raise ValueError(f"recorded timesteps {recs[0]['timesteps']} differ from the manifest's "
                             f"{self.timestep_values}")
        for name in ("inputs/latents", "inputs/text"):
            self.store.check_rows(name, idx)         # the recorded checksums, as for activations
        latents = torch.from_numpy(np.ascontiguousarray(self.store.inputs["latents"].array()[idx]))
        text = torch.from_numpy(np.ascontiguousarray(self.store.inputs["text"].array()[idx]))
        timesteps = torch.tensor(recs[0]["timesteps"], dtype=torch.float64).to(_dtype(dtypes["timesteps"]))
        return Trajectory(idx, self.steps, latents.to(_dtype(dtypes["latents"])), timesteps,
                          text.to(_dtype(dtypes["text"])))
