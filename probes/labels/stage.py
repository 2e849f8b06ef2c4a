"""The labelling stage: each task's labeler run once per image of a store, and once per step on the
test split's decoded intermediate images, every rank on its own shard.

A stage of its own so that the data module only calls it (and a job script can label a finished
store without Lightning): it builds the labelers a config names, fills their caches for a shard,
and after the ranks' barrier reopens each cache, so that every rank reads what all of them wrote.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from probes.common.config_group import GroupFile
from probes.labels import check_labeler
from probes.labels.base import Labeler, build_labeler
from probes.labels.cache import LabelCache
from probes.store.activations import ActivationStore
from probes.tasks import get_task


def labeler_configs(labels: Mapping[str, Any] | GroupFile | str | os.PathLike | None, key: str
                    ) -> dict[str, dict[str, Any]]:
    """``{task: {name: <labeler>, **arguments}}`` from a mapping, a config group named in a config, or a
    group file (``configs/labels/*.yaml``), each task and labeler name checked now, before any compute
    (``key``: the config key, named in errors). None: no labelers."""
    if isinstance(labels, GroupFile):             # a labels group named in a config, read when parsed
        labels = labels.content
    elif isinstance(labels, (str, os.PathLike)):  # a labels group file, e.g. configs/labels/sd14.yaml
        labels = yaml.safe_load(Path(labels).read_text())
    out = {}
    for task, cfg in dict(labels or {}).items():
        if not isinstance(cfg, Mapping) or "name" not in cfg:
            raise ValueError(f"{key}.{task} must be a mapping with a 'name' (a labeler), got {cfg!r}")
        out[task] = dict(cfg)     # an export's frozen config (MappingProxyType) becomes a plain dict
        get_task(task)            # unknown names list the valid ones
        check_labeler(cfg["name"])
    return out


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
                barrier: Callable[[], None] = lambda: None,
                decoded_labelers: Mapping[str, Labeler] | None = None
                ) -> tuple[dict[str, LabelCache], dict[str, LabelCache]]:
    """Label this rank's ``shard`` of the final images and ``decoded_shard`` of the decoded ones
    (with ``decoded_labelers`` where given, e.g. pseudo-labelers when the labels are exact).

    :return: ``(caches, decoded caches)``, reopened after the barrier (every rank's rows committed).
    """
    on_decoded = decoded_labelers_of(labelers, decoded_labelers)
    for cache in label_caches(store, labelers).values():
        cache.ensure(shard, device=device, progress=progress)
    barrier()
    decoded = label_caches(store, on_decoded, "decoded")
    if decoded:
        for cache in decoded.values():
            cache.ensure(decoded_shard, device=device, progress=progress)
        barrier()
    return label_caches(store, labelers), label_caches(store, on_decoded, "decoded")


def decoded_labelers_of(labelers: Mapping[str, Labeler], decoded: Mapping[str, Labeler] | None
                        ) -> dict[str, Labeler]:
    """Each task's labeler of the decoded images: ``decoded``'s where it names one, else the labels' own."""
    return {task: (decoded or {}).get(task, labeler) for task, labeler in labelers.items()}
