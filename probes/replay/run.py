"""Run a permuted or freshly initialised U-Net on a recorded trajectory and capture its activations.

The protocol's permuted-weights control generates its *own* images, so its labels are a labeler's
output on other (often noise-like) images, and "the probe fails on the control" mixes two
changes. The same-image controls change only the features: the control U-Net receives exactly
the trained model's inputs at every step (its ``x_t``, timestep and text embeddings, recorded
during generation) and its activations are probed against the trained model's labels. Random
features, same inputs, same labels.

:func:`ensure_replay_store` writes the activations into a store of their own that reads its
images (and so its labels) from the source store (``images_from``); :func:`replay` is the loop
itself, for any :class:`~probes.replay.trajectory.TrajectorySource`, and also feeds streamed runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probes.common.hashing import sha256_json
from probes.common.progress import progress_bar
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.generation.capture import ActivationCapture
from probes.generation.sampling import CaptureSpec, batches, denoising
from probes.replay.trajectory import StoreTrajectory, TrajectorySource
from probes.store.activations import ActivationStore
from probes.store.fill import shard_of
from probes.store.locks import store_lock

WEIGHTS = ("permuted", "random")


@dataclass
class ReplaySpec:
    """Which U-Net is run on the trained model's recorded trajectory (``data.replay``).

    :param weights: ``permuted`` (every weight tensor of the U-Net permuted elementwise with ``seed``,
        the protocol's control, as ``data.diffusion.permute_seed``) or ``random`` (a freshly
        initialised U-Net of the same architecture, diffusers' default init under ``seed``).
    :param seed: the permutation's or the initialisation's seed.
    :param batch_size: images per replayed U-Net call (default: ``data.generation.batch_size``).
    """

    weights: str = "permuted"
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"data.replay.weights must be one of {WEIGHTS} (permuted: the trained U-Net's weights "
                             f"permuted elementwise; random: a freshly initialised U-Net), got {self.weights!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"data.replay.batch_size must be >= 1, got {self.batch_size}")

    def identity(self) -> dict[str, Any]:
        """What the replayed activations depend on (the batch size too: batched kernels sum in another order)."""
        return {"weights": self.weights, "seed": self.seed, "batch_size": self.batch_size}

    @property
    def name(self) -> str:
        """``control_permuted_same_images`` or ``control_random_same_images``: how reports name it."""
        return f"control_{self.weights}_same_images"


def replay_pipeline(spec: ReplaySpec, diffusion: DiffusionSpec, device: str):
    """The pipeline whose U-Net is replayed: the trained model's with its U-Net permuted, or with a fresh one."""
    if spec.weights == "permuted":
        return load_pipeline(replace(diffusion, permute_seed=spec.seed), device)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline(replace(diffusion, permute_seed=None), device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        fresh = type(pipe.unet).from_config(pipe.unet.config)
    fresh.set_attn_processor(AttnProcessor2_0())
    pipe.unet = fresh.to(device=pipe.device, dtype=pipe.unet.dtype).eval()
    return pipe


@torch.no_grad()
def replay(pipe, source: TrajectorySource, indices: Sequence[int], layers: Sequence[LayerInfo], capture: CaptureSpec,
           num_steps: int, batch_size: int, acts_device: str | None = "cpu", progress: bool = True,
           desc: str = "replaying") -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """``(indices, {layer: [B, S, halves, T, C]})`` per batch: ``pipe.unet`` run once per captured step on
    the source's inputs, its layers captured as generation captures them.

    With ``capture.halves: cond`` only the conditional half is run (the conditional activations of a
    U-Net do not depend on the unconditional rows of its batch); ``both`` runs the guidance batch
    ``[uncond, cond]`` as the sampler did.
    """
    if any(layer.in_vae for layer in layers):
        raise ValueError("the VAE decoder's layers read the latent after each sampler step, which a replay of the "
                         "U-Net's inputs does not produce: drop them from data.capture.layers for a replay")
    both = capture.halves == "both"
    cap = ActivationCapture(pipe.unet, layers, num_steps, source.steps, capture.halves, getattr(torch, capture.dtype),
                            guidance=both)
    chunks = batches(indices, batch_size)
    bar = progress_bar(len(chunks) * len(source.steps), desc, "step", progress)
    with cap, denoising(pipe):
        for chunk in chunks:
            traj = source.batch(chunk)
            if both and traj.text.shape[1] != 2:
                raise ValueError("capture.halves: both needs a trajectory recorded with classifier-free guidance")
            cap.reset()
            text = traj.text.to(pipe.device)
            emb = torch.cat([text[:, 0], text[:, 1]]) if both else text[:, -1]
            for si, step in enumerate(traj.steps):
                cap.at_step(step, float(traj.timesteps[si]))
                x = traj.latents[:, si].to(pipe.device)
                pipe.unet(torch.cat([x, x]) if both else x, traj.timesteps[si].to(pipe.device),
                          encoder_hidden_states=emb, return_dict=False)
                bar.update(1)
            yield list(traj.indices), cap.collect(acts_device)
    bar.close()


def replay_request(source: ActivationStore, spec: ReplaySpec, diffusion: DiffusionSpec) -> dict[str, Any]:
    """What a replay store depends on: its source store, the replayed U-Net and the capture (from the source)."""
    return {"replay_of": source.manifest["fingerprint"], "replay": spec.identity(), "model": diffusion.identity()}


def replay_store_dir(source: ActivationStore, spec: ReplaySpec, diffusion: DiffusionSpec) -> Path:
    """``<source's parent>/replay-<fingerprint>``: one replay store per source store and replayed U-Net."""
    return source.root.parent / f"replay-{sha256_json(replay_request(source, spec, diffusion), 12)}"


def replay_manifest(source: ActivationStore, spec: ReplaySpec, diffusion: DiffusionSpec) -> dict[str, Any]:
    request = replay_request(source, spec, diffusion)
    cap = {k: v for k, v in source.manifest["capture"].items() if k != "inputs"}
    return {**{k: v for k, v in source.manifest.items() if k not in ("format_version", "created")},
            "fingerprint": sha256_json(request, 12), "request": request,
            "images_from": str(source.root.resolve()), "capture": dict(cap, store_activations=True),
            "model": dict(source.manifest["model"], replay=spec.identity(), replay_name=spec.name)}


def ensure_replay_store(source: ActivationStore, spec: ReplaySpec, diffusion: DiffusionSpec, capture: CaptureSpec,
                        generation_batch: int, device: str, rank: int = 0, world: int = 1,
                        barrier: Callable[[], None] = lambda: None, progress: bool = True) -> ActivationStore:
    """The replay store of ``source`` for ``spec``, made (this rank's shard of it) where missing."""
    root = replay_store_dir(source, spec, diffusion)
    manifest = replay_manifest(source, spec, diffusion)
    if rank == 0:
        with store_lock(root):
            if not (root / "manifest.json").exists():
                ActivationStore.create(root, manifest)
    barrier()
    store = ActivationStore(root)
    if store.manifest["fingerprint"] != manifest["fingerprint"]:
        raise ValueError(f"the replay store at {root} was made for another source or U-Net; delete it")
    todo = shard_of(store.missing(), generation_batch, rank, world)
    if todo:
        pipe = replay_pipeline(spec, diffusion, device)
        traj = StoreTrajectory(source)
        bs = spec.batch_size or generation_batch
        with store_lock(root) if world == 1 else nullcontext():
            for idx, acts in replay(pipe, traj, todo, store.layers, capture, int(source.manifest["generation"]["steps"]),
                                    bs, progress=progress, desc=f"replaying ({spec.name})"):
                recs = [{k: source.commits.record(i).get(k) for k in ("prompt", "seed")} | {"replay": spec.identity()}
                        for i in idx]
                store.write_batch(idx, None, {n: a.numpy() for n, a in acts.items()}, recs)
        store.close()
        print(f"[replay] {spec.name}: {len(todo)} images x {len(traj.steps)} steps on the recorded trajectory of "
              f"{source.root} -> {root}", flush=True)
        del pipe
    barrier()
    return ActivationStore(root)
