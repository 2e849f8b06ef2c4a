"""Object embeddings cache: one pooled vector per (image, object, layer), resumable and atomic.

Extracting features is the expensive part of every lens experiment, and each experiment reads
the same objects under several distances and layer combinations, so the pooled vectors are kept
on disk, with the activation store's building blocks (:mod:`probes.store.activations`) and
conventions rather than a new format:

    <cache root>/<fingerprint>/
      manifest.json        model identity, layers (name, module, channels, grid), feature settings
                           (t, prompt, noise seed, denoising), pooling, dataset fingerprint,
                           variant (a transformation and its strength), shapes, code version;
                           written last, so a folder without it is not a cache
      emb/<layer>.npy      [items, max_objects, channels] preallocated, rows written in place;
                           unused object slots are NaN
      commits/<item>.json  one marker per finished item, written after the rows are synced: its
                           item id, instance ids, classes, pixel areas (and sequence/frame for video)

The fingerprint (the folder name) hashes everything the vectors depend on, so two runs with the
same settings share a cache and any change of settings gets a fresh one. An interrupted fill
resumes at the first item without a marker; a half-written item never reads as valid.

An image keeps at most ``max_objects`` objects (its largest, by visible pixels): COCO images have
dozens of tiny instances, and a fixed slot count keeps the arrays preallocatable.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probes.common.files import atomic_write_text
from probes.common.hashing import sha256_text
from probes.common.progress import progress_bar
from probes.common.version import code_version
from probes.diffusion.layers import LayerInfo
from probes.experiments.lens.datasets.common import LensItem
from probes.experiments.lens.pooling import instance_ids, pool_instances
from probes.store.activations import CommitLog, PreallocatedArray, check_disk
from probes.store.locks import sweep_temporaries
from probes.store.manifest import request_fingerprint

FORMAT_VERSION = 1
KEY_STRIDE = 1 << 20      # object key = item index * KEY_STRIDE + instance id (ids < 2**20)
Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class PoolingSpec:
    """How features become one vector per object (:mod:`probes.experiments.lens.pooling`).

    :param method: ``area`` (mask down-sampled by area to the feature grid), ``upsample``
        (features up-sampled to the mask), or ``auto``: ``area`` unless the mask is smaller than
        the feature grid (a strong crop of a small image), then ``upsample``.
    :param min_cells: an object must cover more than this many feature cells in every layer.
    :param max_objects: objects kept per image (the largest); see the module docstring.
    :param dtype: storage dtype of the vectors (``float32`` or ``float16``: half the disk).
    """

    method: str = "auto"
    min_cells: float = 0.0
    max_objects: int = 16
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in ("area", "upsample", "auto"):
            raise ValueError(f"pooling.method must be area, upsample or auto, got {self.method!r}")
        if self.max_objects < 1:
            raise ValueError(f"pooling.max_objects must be >= 1, got {self.max_objects}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"pooling.dtype must be float32 or float16, got {self.dtype!r}")


def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """What a dataset's items depend on: its own ``fingerprint()`` when it has one (toy data),
    else its type, folders and a hash of its item / sequence list (COCO, VOC, DAVIS)."""
    if hasattr(dataset, "fingerprint"):
        return dict(dataset.fingerprint())
    fp: dict[str, Any] = {"dataset": type(dataset).__name__}
    for attr in ("root", "annotation_file", "image_dir", "images", "annotations", "min_area"):
        if hasattr(dataset, attr):
            fp[attr] = str(getattr(dataset, attr))
    if getattr(dataset, "category_ids", None) is not None:
        fp["category_ids"] = sorted(dataset.category_ids)
    for attr in ("image_ids", "names", "sequences"):
        if hasattr(dataset, attr):
            ids = [str(v) for v in getattr(dataset, attr)]
            fp[attr] = {"count": len(ids), "sha256": sha256_text("\n".join(ids), 16)}
    return fp


def cache_request(model: dict[str, Any], layers: Sequence[LayerInfo], features: dict[str, Any],
                  pooling: PoolingSpec, dataset: dict[str, Any], variant: dict[str, Any] | None,
                  num_items: int) -> dict[str, Any]:
    """Everything the cached vectors depend on; its hash names the cache folder."""
    return {"model": model, "layers": [l.to_dict() for l in layers], "features": features,
            "pooling": asdict(pooling), "dataset": dataset, "variant": variant or {}, "num_items": num_items}


@dataclass
class ObjectEmbeddings:
    """The objects of a cache (or a subset), one row each, with one ``[M, C]`` array per layer.

    ``key`` identifies an object across variants of the same dataset (item index and instance
    id), which is what instance matching compares.
    """

    item: np.ndarray                      # [M] item index in the dataset
    instance: np.ndarray                  # [M] instance id in its mask
    label: np.ndarray                     # [M] class id, -1 when the dataset has none
    sequence: np.ndarray                  # [M] str, "" outside videos
    frame: np.ndarray                     # [M] frame index, -1 outside videos
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> np.ndarray:
        return self.item.astype(np.int64) * KEY_STRIDE + self.instance.astype(np.int64)

    def __len__(self) -> int:
        return len(self.item)

    def select(self, mask: np.ndarray) -> ObjectEmbeddings:
        """The rows where ``mask`` (bool ``[M]`` or indices) holds."""
        return ObjectEmbeddings(self.item[mask], self.instance[mask], self.label[mask], self.sequence[mask],
                                self.frame[mask], {k: v[mask] for k, v in self.vectors.items()})

    def layer(self, name: str) -> np.ndarray:
        try:
            return self.vectors[name]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in these embeddings; layers: {', '.join(self.vectors)}") from None


class EmbeddingCache:
    """One cache folder (see the module docstring): open it, fill missing items, load objects."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no embedding cache at {self.root} (manifest.json missing)")
        fix = f"delete the folder {self.root} and the cache is computed again"
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
            layers = self.manifest["request"]["layers"]
        except json.JSONDecodeError as err:
            raise ValueError(f"{mpath} is not valid JSON ({err.msg} at line {err.lineno}): it was truncated or "
                             f"edited; {fix}") from err
        except (KeyError, TypeError) as err:
            raise ValueError(f"{mpath} is not an embedding cache manifest (no request.layers); {fix}") from err
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"embedding cache {self.root} has format {self.manifest.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}; delete the folder to rebuild it")
        self.layers = [LayerInfo.from_dict(d) for d in layers]
        self.arrays = {l.name: PreallocatedArray(self.root / "emb" / f"{l.name}.npy", fix=fix) for l in self.layers}
        self.commits = CommitLog(self.root / "commits", self.num_items)

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, cache_root: str | Path, request: dict[str, Any]) -> EmbeddingCache:
        """The cache for ``request`` under ``cache_root``: reopened if it exists, else preallocated.

        The manifest is written after the arrays, so a crash during creation leaves a folder that
        is simply created again.
        """
        fp = request_fingerprint(request)
        root = Path(cache_root) / fp
        if (root / "manifest.json").exists():
            sweep_temporaries(root)          # what a killed lens run left half-written
            cache = cls(root)
            if cache.manifest["request"] != json.loads(json.dumps(request, default=str)):
                raise RuntimeError(f"embedding cache {root} was written for other settings than its fingerprint "
                                   f"{fp} says (a hash collision or a hand-edited manifest): delete the folder")
            return cache
        pooling = request["pooling"]
        n, slots = int(request["num_items"]), int(pooling["max_objects"])
        itemsize = np.dtype(pooling["dtype"]).itemsize
        check_disk(root, n * slots * itemsize * sum(l["channels"] for l in request["layers"]),
                   f"the embedding cache ({n} items, {len(request['layers'])} layers)")
        for layer in request["layers"]:
            PreallocatedArray.create(root / "emb" / f"{layer['name']}.npy", (n, slots, int(layer["channels"])),
                                     pooling["dtype"])
        (root / "commits").mkdir(parents=True, exist_ok=True)
        manifest = {"format_version": FORMAT_VERSION, "kind": "lens-embeddings", "fingerprint": fp,
                    "request": request, "code_version": code_version(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "layout": "emb/<layer>.npy: [items, max_objects, channels], NaN = empty slot; "
                              "commits/<item>.json: ids, classes, areas of the slots in order"}
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1, default=str))
        return cls(root)

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.manifest["request"]["num_items"])

    @property
    def pooling(self) -> PoolingSpec:
        return PoolingSpec(**self.manifest["request"]["pooling"])

    def missing(self) -> list[int]:
        done = self.commits.done()
        return [i for i in range(self.num_items) if i not in done]

    # -- filling -------------------------------------------------------------------------------
    def fill(self, items: Iterable[LensItem], extract: Callable[[list[np.ndarray], list[str]], dict[str, Any]],
             transform: Transform | None = None, batch_size: int = 16, desc: str = "embeddings",
             progress: bool = True) -> int:
        """Compute and commit every item not yet committed; returns how many were computed.

        ``items`` yields the dataset's items in index order (committed ones are skipped);
        ``extract(images, keys)`` returns ``{layer: [B, C, h, w]}`` (a
        :class:`probes.experiments.lens.features.FeatureExtractor`'s ``extract``); ``transform(image, mask)``
        is applied to both before extraction (a robustness variant).
        """
        todo = set(self.missing())
        if not todo:
            return 0
        bar = progress_bar(len(todo), desc, "item", progress, mininterval=2.0, leave=False)
        batch: list[tuple[int, LensItem]] = []
        computed = 0
        for index, item in enumerate(items):
            if index >= self.num_items:
                raise ValueError(f"the dataset yields more than the cache's {self.num_items} items: "
                                 f"its content changed since the cache was made")
            if index not in todo:
                continue
            if transform is not None:
                image, mask = transform(item["image"], item["instances"])
                item = {**item, "image": image, "instances": mask}
            batch.append((index, item))
            if len(batch) == batch_size:
                computed += self._write(batch, extract)
                bar.update(len(batch))
                batch = []
        if batch:
            computed += self._write(batch, extract)
            bar.update(len(batch))
        bar.close()
        left = self.missing()
        if left:
            raise RuntimeError(f"embedding cache {self.root}: items {left[:5]}... were never yielded: the dataset "
                               f"is shorter than the {self.num_items} items the cache was made for")
        return computed

    def _write(self, batch: list[tuple[int, LensItem]], extract: Callable) -> int:
        feats = extract([it["image"] for _, it in batch], [str(it["id"]) for _, it in batch])
        pooling = self.pooling
        records = []
        for b, (index, item) in enumerate(batch):
            rows, record = self._pool(item, {name: f[b] for name, f in feats.items()}, pooling)
            for name, arr in self.arrays.items():
                arr.write_row(index, rows[name])
            records.append((index, record))
        for arr in self.arrays.values():
            arr.sync()
        for index, record in records:            # markers last: a crash leaves no half item
            self.commits.mark(index, record)
        return len(batch)

    def _pool(self, item: LensItem, feats: dict[str, Any], pooling: PoolingSpec
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Slots ``[max_objects, C]`` per layer and the commit record of one item."""
        mask = np.asarray(item["instances"])
        classes = item.get("classes") or {}
        ids = [int(k) for k in instance_ids(mask) if int(k) in classes or not classes]
        pooled = {}
        for name, f in feats.items():
            h, w = f.shape[-2:]
            method = pooling.method
            if method == "auto":
                method = "area" if mask.shape[0] >= h and mask.shape[1] >= w else "upsample"
            pooled[name] = pool_instances(f, mask, method, ids, pooling.min_cells, "nan").embeddings
        finite = np.ones(len(ids), bool)
        for e in pooled.values():
            finite &= np.isfinite(e).all(axis=1)
        areas = np.array([int((mask == k).sum()) for k in ids], dtype=np.int64)
        order = [i for i in np.argsort(-areas, kind="stable") if finite[i]]
        kept, dropped = order[:pooling.max_objects], order[pooling.max_objects:]
        rows = {}
        for name, e in pooled.items():
            slots = np.full((pooling.max_objects, e.shape[1]), np.nan, dtype=pooling.dtype)
            slots[:len(kept)] = e[kept]
            rows[name] = slots
        record = {"id": str(item["id"]), "ids": [ids[i] for i in kept],
                  "classes": [classes.get(ids[i]) for i in kept], "areas": [int(areas[i]) for i in kept],
                  "dropped": [ids[i] for i in dropped], "vanished": [ids[i] for i in range(len(ids)) if not finite[i]]}
        if "sequence" in item:
            record.update(sequence=str(item["sequence"]), frame=int(item["frame"]))
        return rows, record

    # -- reading -------------------------------------------------------------------------------
    def load(self, layers: Sequence[str] | None = None) -> ObjectEmbeddings:
        """Every committed object (item order, then slot order), with the vectors of ``layers``
        (default: all) as float32 ``[M, C]``."""
        names = list(self.arrays) if layers is None else list(layers)
        unknown = [n for n in names if n not in self.arrays]
        if unknown:
            raise KeyError(f"layers {unknown} are not in the cache {self.root}; cached: {', '.join(self.arrays)}")
        item, inst, label, seq, frame, slot = [], [], [], [], [], []
        for index in sorted(self.commits.done()):
            rec = self.commits.record(index)
            for s, (k, c) in enumerate(zip(rec["ids"], rec["classes"])):
                item.append(index)
                inst.append(k)
                label.append(-1 if c is None else int(c))
                seq.append(rec.get("sequence", ""))
                frame.append(rec.get("frame", -1))
                slot.append(s)
        item_a, slot_a = np.asarray(item, np.int64), np.asarray(slot, np.int64)
        vectors = {n: np.asarray(self.arrays[n].array()[item_a, slot_a], dtype=np.float32) for n in names}
        for n, v in vectors.items():   # committed slots are finite by construction (_pool): NaN means damage
            bad = ~np.isfinite(v).all(axis=1)
            if bad.any():
                k = int(np.argmax(bad))
                raise ValueError(f"{self.arrays[n].path}: the committed embedding of item {int(item_a[k])} (slot "
                                 f"{int(slot_a[k])}, {int(bad.sum())} object(s) in all) is not finite: the file was "
                                 f"damaged or edited after it was written, and a NaN would silently move every "
                                 f"distance; delete {self.commits._path(int(item_a[k]))} (that item is computed again) "
                                 f"or delete the cache folder {self.root}")
        return ObjectEmbeddings(item_a, np.asarray(inst, np.int64), np.asarray(label, np.int64),
                                np.asarray(seq, dtype=object), np.asarray(frame, np.int64), vectors)

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.close()
