"""The generation stage: fill an activation store with every image, step and layer, in one pass.

Callable without Lightning (e.g. from a SLURM array job): each rank generates a disjoint shard of
whole batches into the same store, and a rerun generates only what is missing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from probes.generation.sampling import CaptureSpec, GenerationSpec, batches, generate
from probes.models.layers import LayerInfo
from probes.models.loading import DiffusionSpec, load_pipeline
from probes.prompts.sets import PromptRecord
from probes.store.activations import ActivationStore, check_disk, human_bytes
from probes.store.manifest import build_manifest, request_fingerprint, store_request


def shard_of(indices: Sequence[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This rank's share: whole fixed batches, dealt round-robin (disjoint across ranks)."""
    out: list[int] = []
    for k, chunk in enumerate(batches(indices, batch_size)):
        if k % world == rank:
            out += chunk
    return out


def open_store(store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
               generation: GenerationSpec, capture: CaptureSpec, device: str, rank: int = 0,
               barrier: Callable[[], None] = lambda: None, store_activations: bool = True):
    """Open the store at ``store_dir``, creating it (rank 0) if needed; returns ``(store, pipe or None)``.

    The pipeline is returned when it had to be loaded to build the manifest, so it is not loaded twice.
    """
    pipe = None
    if rank == 0 and not (store_dir / "manifest.json").exists():
        pipe = load_pipeline(diffusion, device)
        manifest = build_manifest(pipe, diffusion, generation, capture, records, store_activations)
        need = ActivationStore.required_bytes(manifest)
        what = (f"{len(manifest['capture']['layers'])} layers x {len(manifest['capture']['steps'])} steps"
                if store_activations else "images only (streaming: activations are not stored)")
        print(f"[store] {store_dir}: {len(records)} images, {what} -> {human_bytes(need)} on disk", flush=True)
        ActivationStore.create(store_dir, manifest)
    barrier()
    store = ActivationStore(store_dir)
    new = store_request(diffusion, generation, capture, records, store_activations)
    if store.manifest["fingerprint"] != request_fingerprint(new):
        old = store.manifest["request"]
        diff = [k for k in sorted(set(new) | set(old)) if old.get(k) != new.get(k)]
        raise ValueError(f"the store at {store_dir} was made with other settings (differs in: {', '.join(diff)}); "
                         f"use another data.store_dir (or leave it unset to get one per configuration)")
    return store, pipe


def commit_records(records: Sequence[PromptRecord], batch, rank: int) -> list[dict[str, Any]]:
    """What each sample's commit marker records: its prompt and seed, its U-Net calls, its rank."""
    return [dict(asdict(records[i]), guided_calls=batch.unet_calls, rank=rank) for i in batch.indices]


def ensure_store(store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
                 generation: GenerationSpec, capture: CaptureSpec, device: str, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None, progress: bool = True) -> ActivationStore:
    """Create the store if needed and generate the samples of this rank's shard that are missing."""
    store, pipe = open_store(store_dir, records, diffusion, generation, capture, device, rank, barrier)
    todo = shard_of(store.missing(), generation.batch_size, rank, world)
    if todo:
        check_disk(store_dir, ActivationStore.required_bytes(store.manifest, len(todo)), f"generating {len(todo)} samples")
        if pipe is None:
            pipe = load_pipeline(diffusion, device)
        layers = [LayerInfo.from_dict(d) for d in store.manifest["capture"]["layers"]]
        calls = 0
        for batch in generate(pipe, records, todo, generation, layers, capture, progress=progress,
                              desc=f"generating (rank {rank})" if world > 1 else "generating"):
            if batch.timesteps != store.manifest["capture"]["all_timesteps"]:
                raise RuntimeError(f"sampler visited timesteps {batch.timesteps}, the store expects "
                                   f"{store.manifest['capture']['all_timesteps']}")
            acts = {n: a.numpy() for n, a in batch.acts.items()}
            recs = commit_records(records, batch, rank)
            store.write_batch(batch.indices, batch.images, acts, recs, batch.x0_images)
            calls += batch.guided_calls
        store.close()
        print(f"[generation] rank {rank}: {len(todo)} images, {calls} guided U-Net calls "
              f"({generation.steps} per image, every layer and step captured in the same pass)", flush=True)
    del pipe
    barrier()
    return ActivationStore(store_dir)
