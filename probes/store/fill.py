"""The generation stage: fill an activation store with every image, step and layer, in one pass.

Callable without Lightning (e.g. from a SLURM array job): each rank generates a disjoint shard of
whole batches into the same store, and a rerun generates only what is missing.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.generation.sampling import CaptureSpec, GenerationSpec, batches
from probes.generation.source import store_batches
from probes.prompts.sets import PromptRecord
from probes.store.activations import ActivationStore, check_disk, human_bytes, refuse_orphaned_data
from probes.store.locks import store_lock, sweep_temporaries
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
    pipe, reused = None, False
    if rank == 0:
        with store_lock(store_dir):  # two runs at once: the second waits here, then reuses the store
            sweep_temporaries(store_dir)
            reused = (store_dir / "manifest.json").exists()
            if not reused:
                refuse_orphaned_data(store_dir)  # before loading the model, not after
                pipe = load_pipeline(diffusion, device)
                create_store(pipe, store_dir, records, diffusion, generation, capture, store_activations)
                for note in stores_left_behind(store_dir, store_request(diffusion, generation, capture, records,
                                                                        store_activations)):
                    print(note, flush=True)
    barrier()
    store = ActivationStore(store_dir)
    new = store_request(diffusion, generation, capture, records, store_activations)
    if store.manifest["fingerprint"] != request_fingerprint(new):
        diff = "; ".join(differences(store.manifest["request"], new))
        raise ValueError(f"the store at {store_dir} was made with other settings (differs in: {diff}); "
                         f"use the store's settings, another data.store_dir, or leave data.store_dir unset to "
                         f"get one store per configuration")
    if reused:
        print(f"[store] reusing {store_dir} ({int(store.committed().sum())} of {store.num_samples} samples "
              f"committed)", flush=True)
    return store, pipe


def create_store(pipe, store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
                 generation: GenerationSpec, capture: CaptureSpec, store_activations: bool) -> ActivationStore:
    """Build the manifest from the loaded pipeline and preallocate the store, saying what it costs."""
    manifest = build_manifest(pipe, diffusion, generation, capture, records, store_activations)
    need = ActivationStore.required_bytes(manifest)
    what = (f"{len(manifest['capture']['layers'])} layers x {len(manifest['capture']['steps'])} steps"
            if store_activations else "images only (streaming: activations are not stored)")
    print(f"[store] {store_dir}: {len(records)} images, {what} -> {human_bytes(need)} on disk", flush=True)
    return ActivationStore.create(store_dir, manifest)


def _other_than_batch(request: dict[str, Any]) -> dict[str, Any]:
    req = json.loads(json.dumps(request, default=str))
    req.get("generation", {}).pop("batch_size", None)
    return req


def disk_usage(folder: Path) -> int:
    """Bytes a folder occupies on disk (allocated blocks: a preallocated array counts only what was written)."""
    total = 0
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink():
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def stores_left_behind(store_dir: Path, request: dict[str, Any]) -> list[str]:
    """One notice per store beside ``store_dir`` made with the same settings but another
    ``generation.batch_size``: a rerun with another batch size gets a new store (another batch
    composition gives other activations), and the old one, often half-finished, would otherwise stay
    on disk without a word."""
    parent, notes = Path(store_dir).parent, []
    want = _other_than_batch(request)
    for folder in sorted(p for p in parent.iterdir() if p.is_dir() and p != Path(store_dir)) if parent.is_dir() else []:
        try:
            old = json.loads((folder / "manifest.json").read_text())
            same = _other_than_batch(old["request"]) == want
            size, n = old["request"]["generation"]["batch_size"], int(old["num_samples"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not same:
            continue
        done = sum(1 for p in (folder / "commits").glob("*.json") if p.stem.isdigit())
        state = "half-finished: " if done < n else ""
        notes.append(f"[store] note: {folder} holds a {state}store of the same settings made with "
                     f"generation.batch_size={size} ({done} of {n} samples committed, {human_bytes(disk_usage(folder))} "
                     f"on disk). Another batch size gives other activations, so it is not reused: this run makes "
                     f"{store_dir}. Delete {folder} if you no longer need it, or rerun with "
                     f"generation.batch_size={size} to finish and use it.")
    return notes


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two store requests differ, with both values (``generation.batch_size (store: 2, now: 3)``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k, "absent"), new.get(k, "absent"), f"{prefix}{k}.")]
    if old == new:
        return []
    return [f"{prefix[:-1]} (store: {_short(old)}, now: {_short(new)})"]


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def commit_records(records: Sequence[PromptRecord], batch, rank: int) -> list[dict[str, Any]]:
    """What each sample's commit marker records: its prompt and seed, its U-Net calls, its rank,
    whether its decoded intermediate images were stored (only the test split's are: see
    ``decoded_missing``), and with recorded inputs the dtypes and timesteps the U-Net received (a
    replay casts the stored float32 values back to them)."""
    decoded = set(batch.decoded_indices)
    extra: dict[str, Any] = {}
    inputs = getattr(batch, "inputs", None)
    if inputs is not None:
        extra["inputs"] = {"dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in inputs.items()},
                           "timesteps": [float(t) for t in inputs["timesteps"]]}
    return [dict(asdict(records[i]), guided_calls=batch.unet_calls, rank=rank, decoded=i in decoded, **extra)
            for i in batch.indices]


def input_rows(batch) -> dict[str, Any] | None:
    """The batch's recorded denoiser inputs as the store keeps them (float32 arrays), or None."""
    inputs = getattr(batch, "inputs", None)
    if inputs is None:
        return None
    return {k: v.to(torch.float32).numpy() for k, v in inputs.items() if k != "timesteps"}


def decoded_missing(store: ActivationStore, indices: Sequence[int]) -> list[int]:
    """Committed samples among ``indices`` stored without their decoded intermediate images.

    Only the test split's intermediate images are decoded, and the store's fingerprint does not
    cover the split (a run with another ``test_fraction`` shares the store): such samples are
    regenerated (bit-identically: same batch, same seed) to add the decoded images their new split
    needs. Which latent is decoded (noisy or x0) *is* in the fingerprint and the manifest, so a
    store never mixes the two. Markers of stores made before the ``decoded`` flag carry
    ``x0_decoded``, and those made before that decoded every sample.
    """
    if store.decoded_images is None:
        return []
    done = store.commits.done()
    out = []
    for i in (int(i) for i in indices):
        if i in done:
            rec = store.commits.record(i)
            if not rec.get("decoded", rec.get("x0_decoded", True)):
                out.append(i)
    return out


def ensure_store(store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
                 generation: GenerationSpec, capture: CaptureSpec, device: str, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None, progress: bool = True,
                 store_activations: bool = True) -> ActivationStore:
    """Create the store if needed and generate the samples of this rank's shard that are missing.

    A single-process run holds the store's lock while it generates, so a second run started on
    the same store waits and then reuses the samples instead of generating them twice. Ranks of
    one distributed run write disjoint shards and must not wait for each other: they lock only
    while rank 0 creates the store.
    """
    with store_lock(store_dir) if world == 1 else nullcontext():
        return fill_store(store_dir, records, diffusion, generation, capture, device, rank, world, barrier, progress,
                          store_activations)


def fill_store(store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
               generation: GenerationSpec, capture: CaptureSpec, device: str, rank: int = 0, world: int = 1,
               barrier: Callable[[], None] = lambda: None, progress: bool = True,
               store_activations: bool = True) -> ActivationStore:
    """The body of :func:`ensure_store`, without its lock (``store_activations=False``: the images-only store of
    a streamed run, filled ahead of time, e.g. for a replay of its recorded inputs)."""
    store, pipe = open_store(store_dir, records, diffusion, generation, capture, device, rank, barrier,
                             store_activations)
    test = [r.index for r in records if r.split == "test"]    # the only split whose decoded images are used
    todo = shard_of(sorted(set(store.missing()) | set(decoded_missing(store, test))), generation.batch_size, rank, world)
    if todo:
        check_disk(store_dir, ActivationStore.required_bytes(store.manifest, len(todo)), f"generating {len(todo)} samples")
        if pipe is None:
            pipe = load_pipeline(diffusion, device)
        layers = store.layers if store.acts else []     # an images-only store: nothing to capture
        calls = 0
        for batch in store_batches(pipe, records, todo, generation, layers, capture, progress=progress,
                                   desc=f"generating (rank {rank})" if world > 1 else "generating", decode=test):
            if batch.timesteps != store.manifest["capture"]["all_timesteps"]:
                raise RuntimeError(f"sampler visited timesteps {batch.timesteps}, the store expects "
                                   f"{store.manifest['capture']['all_timesteps']}")
            acts = {n: a.numpy() for n, a in batch.acts.items()}
            recs = commit_records(records, batch, rank)
            store.write_batch(batch.indices, batch.images, acts, recs, batch.decoded_images, batch.decoded_indices,
                              input_rows(batch))
            calls += batch.guided_calls
        store.close()
        if generation.start == "renders":
            per = len(store.manifest["capture"]["steps"])
            print(f"[generation] rank {rank}: {len(todo)} renders, {calls} conditional U-Net calls ({per} per render: "
                  f"one per captured step, on the render noised to that step)", flush=True)
        else:
            extra = ("; a sample is regenerated in its whole batch, bit-identically"
                     if calls > len(todo) * generation.steps else "")
            print(f"[generation] rank {rank}: {len(todo)} images, {calls} guided U-Net calls "
                  f"({generation.steps} per image, every layer and step captured in the same pass{extra})", flush=True)
    del pipe
    barrier()
    return ActivationStore(store_dir)
