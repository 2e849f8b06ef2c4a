"""The labelling stage: each task's labeler run once per image of a store, and once per step on the
test split's decoded intermediate images, every rank on its own shard.

A stage of its own so that the data module only calls it (and a job script can label a finished
store without Lightning): it builds the labelers a config names, fills their caches for a shard,
and after the ranks' barrier reopens each cache, so that every rank reads what all of them wrote.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from probes.labels.base import Labeler, build_labeler
from probes.labels.cache import LabelCache
from probes.store.activations import ActivationStore


def build_labelers(labels: Mapping[str, Mapping[str, Any]]) -> dict[str, Labeler]:
    """``{task: {name: <labeler>, **arguments}}`` -> the labelers (weights are loaded later, on first use)."""
    out = {}
    for task, cfg in labels.items():
        cfg = dict(cfg)
        out[task] = build_labeler(cfg.pop("name"), **cfg)
    return out


def label_caches(store: ActivationStore, labelers: Mapping[str, Labeler], source: str = "images") -> dict[str, LabelCache]:
    """Each task's cache of ``source`` (``images`` or the store's ``decoded`` images); none for decoded
    images when the store has none."""
    if source == "decoded" and store.decoded_images is None:
        return {}
    return {task: LabelCache(store, task, labeler, source) for task, labeler in labelers.items()}


def label_store(store: ActivationStore, labelers: Mapping[str, Labeler], shard: Sequence[int],
                decoded_shard: Sequence[int], device: str, progress: bool = True,
                barrier: Callable[[], None] = lambda: None) -> tuple[dict[str, LabelCache], dict[str, LabelCache]]:
    """Label this rank's ``shard`` of the final images and ``decoded_shard`` of the decoded ones.

    :return: ``(caches, decoded caches)``, reopened after the barrier (every rank's rows committed).
    """
    for cache in label_caches(store, labelers).values():
        cache.ensure(shard, device=device, progress=progress)
    barrier()
    decoded = label_caches(store, labelers, "decoded")
    if decoded:
        for cache in decoded.values():
            cache.ensure(decoded_shard, device=device, progress=progress)
        barrier()
    return label_caches(store, labelers), label_caches(store, labelers, "decoded")
