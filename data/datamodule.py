"""The LightningDataModule: makes sure the store and labels exist, then serves train/val/test.

``prepare_data`` only fetches files (the prompt CSVs). ``setup`` opens the store, generating the
samples it lacks first (each rank its own disjoint shard of batches, all writing into one store),
then the labels (sharded the same way), then builds the splits and the target statistics
(train split only). Generation is a stage of its own (:func:`ensure_store`), callable without
Lightning, e.g. from a SLURM array job.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from data.generation import CaptureSpec, GenerationSpec, batches, generate, native_size, sampler_timesteps
from data.label_cache import LabelCache
from data.labelers import build_labeler
from data.layers import LayerInfo, LayerRegistry
from data.models import DiffusionSpec, load_pipeline, resolved_revision
from data.prompts import PromptRecord, PromptSpec, load_prompts, prompts_fingerprint, split_indices
from data.store import ActivationStore, check_disk, human_bytes
from data.version import code_version

log = logging.getLogger(__name__)


@dataclass
class ProbeSpec:
    """Everything the probes need to know about the data, handed from data to probes."""

    layers: list[LayerInfo]
    steps: list[int]
    timesteps: list[float]
    tasks: list[str]
    label_size: tuple[int, int]
    target_stats: dict[str, dict[str, float]]
    model: dict[str, Any]
    is_random: bool
    store_dir: str
    data_config: dict[str, Any] = field(default_factory=dict)
    streaming: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeSpec":
        d = dict(d)
        d["layers"] = [LayerInfo.from_dict(x) for x in d["layers"]]
        d["label_size"] = tuple(d["label_size"])
        return cls(**d)


def store_request(diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                  records: Sequence[PromptRecord], store_activations: bool = True) -> dict[str, Any]:
    """What a store's content depends on; its hash names the default store folder."""
    gen = asdict(generation)
    gen.pop("batch_size")
    req = {"model": diffusion.identity(), "generation": gen, "capture": asdict(capture),
           "prompts": prompts_fingerprint(records), "num_samples": len(records)}
    if not store_activations:
        req["images_only"] = True
    return req


def request_fingerprint(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_manifest(pipe, diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                   records: Sequence[PromptRecord], store_activations: bool = True) -> dict[str, Any]:
    height, width = generation.height or native_size(pipe)[0], generation.width or native_size(pipe)[1]
    f = pipe.vae_scale_factor
    if height % (8 * f) or width % (8 * f):
        raise ValueError(f"generation height/width must be multiples of {8 * f} (token grids must divide the "
                         f"labels evenly); got {height}x{width}")
    registry = LayerRegistry.from_unet(pipe.unet, (height // f, width // f))
    layers = registry.select(capture.layers)
    timesteps = sampler_timesteps(pipe, generation)
    steps = list(range(generation.steps)) if capture.steps is None else sorted(set(capture.steps))
    bad = [s for s in steps if not 0 <= s < generation.steps]
    if bad:
        raise ValueError(f"capture.steps {bad} out of range: generation.steps={generation.steps} gives steps 0..{generation.steps - 1}")
    request = store_request(diffusion, generation, capture, records, store_activations)
    model = dict(diffusion.identity(), resolved_revision=resolved_revision(pipe), is_random=diffusion.is_random,
                 dtype=str(pipe.unet.dtype).replace("torch.", ""))
    return {
        "fingerprint": request_fingerprint(request),
        "request": request,
        "code_version": code_version(),
        "model": model,
        "generation": dict(asdict(generation), height=height, width=width,
                           latent_init="torch.manual_seed(seed); torch.randn(1, C, H/8, W/8) on CPU, unscaled"),
        "capture": {"layers": [layer.to_dict() for layer in layers], "steps": steps,
                    "timesteps": [timesteps[s] for s in steps], "all_timesteps": timesteps,
                    "halves": ["cond"] if capture.halves == "cond" else ["uncond", "cond"],
                    "dtype": capture.dtype, "hook": "attn1.to_out.0 output (before dropout and residual)",
                    "store_activations": store_activations},
        "num_samples": len(records),
        "prompts": [asdict(r) for r in records],
    }


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


class ActivationDataset(Dataset):
    """One item per image: its conditional-half activations of every layer and its raw labels."""

    def __init__(self, store: ActivationStore, indices: Sequence[int], labels: dict[str, LabelCache]) -> None:
        self.store, self.indices, self.labels = store, list(indices), labels
        self.cond = store.manifest["capture"]["halves"].index("cond")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        acts = {n: torch.from_numpy(np.array(self.store.activation(n, i)[:, self.cond]))
                for n in self.store.layer_names}
        labels = {t: torch.from_numpy(np.array(c.array()[i])) for t, c in self.labels.items()}
        return {"index": i, "acts": acts, "labels": labels}

    def __getitems__(self, ks: list[int]) -> dict[str, Any]:
        """A whole batch with one read per layer (rows in file order), already collated.

        Per-sample reads plus ``default_collate`` copy every byte twice and pay per-sample
        overhead on each of the 16 layers; this reads each layer's rows straight into the batch.
        """
        idx = np.asarray([self.indices[k] for k in ks])
        order = np.argsort(idx, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        rows = idx[order]
        acts = {}
        for n in self.store.layer_names:
            arr = self.store.acts[n].array()
            data = arr[rows, :, self.cond] if arr.shape[2] > 1 else arr[rows][:, :, 0]
            acts[n] = torch.from_numpy(data[back] if len(rows) > 1 else data)
        labels = {t: torch.from_numpy(np.asarray(c.array()[rows])[back]) for t, c in self.labels.items()}
        return {"index": torch.as_tensor(idx), "acts": acts, "labels": labels}


def _collated(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class StreamingDataset(IterableDataset):
    """Generates its split on the fly and yields batches whose activations never leave the GPU.

    For closed-form (ridge) probes, which need one pass over the data: each image is generated
    once, labelled as soon as it exists (labels and images are cached in an images-only store),
    consumed, and dropped. Batches are already collated (use ``DataLoader(batch_size=None)``).
    """

    def __init__(self, dm: "ActivationDataModule", split: str, indices: Sequence[int]) -> None:
        self.dm, self.split, self.indices = dm, split, list(indices)

    def __iter__(self):
        dm = self.dm
        rank, world, _ = dm._dist()
        # deal single images (not whole batches) so that every rank gets work even for a small
        # split: a rank with an empty stream would skip validation and hang the others' all-reduce
        mine = self.indices[rank::world]
        store, cond = dm.store, dm.store.manifest["capture"]["halves"].index("cond")
        layers = [LayerInfo.from_dict(d) for d in store.manifest["capture"]["layers"]]
        for batch in generate(dm.pipeline(), dm.records(), mine, dm.generation, layers, dm.capture,
                              acts_device=None, progress=dm.progress, desc=f"streaming {self.split}",
                              universe=mine):
            idx = batch.indices
            if store.missing(idx):
                recs = commit_records(dm.records(), batch, rank)
                store.write_batch(idx, batch.images, {}, recs, batch.x0_images)
            labels = {}
            for task, cache in dm.label_caches.items():
                cache.ensure(idx, device=dm._device(), progress=False)
                labels[task] = torch.from_numpy(np.array(cache.array()[idx]))
                if self.split == "test" and store.x0_images is not None:
                    x0 = dm.x0_label_caches.setdefault(task, LabelCache(store, task, cache.labeler, source="x0"))
                    x0.ensure(idx, device=dm._device(), progress=False)
            dm.guided_calls += batch.guided_calls
            yield {"index": torch.tensor(idx), "acts": {n: a[:, :, cond] for n, a in batch.acts.items()},
                   "labels": labels}


class UnpaddedShardSampler(DistributedSampler):
    """Evaluation under DDP: each rank gets a contiguous, disjoint shard and nothing is repeated.

    Lightning's default ``DistributedSampler`` pads the last batches with repeated samples, which
    biases metrics; subclassing ``DistributedSampler`` keeps Lightning from replacing this one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        per = -(-n // num_replicas)
        self.shard = list(range(min(rank * per, n), min((rank + 1) * per, n)))

    def __iter__(self):
        return iter(self.shard)

    def __len__(self) -> int:
        return len(self.shard)


MODES = ("cached", "streaming")


class ActivationDataModule(pl.LightningDataModule):
    """Prompts -> (generated, captured) activation store -> labels -> train/val/test loaders.

    :param diffusion: the model (``source: hub`` for SD v1.4, ``random`` for tiny/benchmarks).
    :param prompts: prompt set and splits.
    :param generation: sampler settings (K-LMS, 15 steps, guidance 7.5, 512x512 by default).
    :param capture: layers, steps, halves and dtype to capture.
    :param labels: task -> labeler, e.g. ``{foreground: {name: tracer}, depth: {name: midas}}``;
        the extra keys are the labeler's arguments.
    :param mode: ``cached`` (activations written to the store, then read for as many epochs as
        needed: SGD probes) or ``streaming`` (nothing cached: each split is generated while it is
        consumed, for one-pass closed-form probes, ``probes.ridge.RidgeProbeModule``).
    :param store_dir: the activation store; default ``<store_root>/<fingerprint of the settings>``.
    :param store_root: parent of default store folders.
    :param batch_size: images per training batch (streaming: ``generation.batch_size``).
    :param num_workers: DataLoader workers (cached mode).
    :param device: where generation and labelers run: ``auto`` (the trainer's device, else CUDA
        when available), ``cpu`` or ``cuda[:k]``.
    :param progress: progress bars.
    """

    def __init__(self, diffusion: DiffusionSpec = DiffusionSpec(), prompts: PromptSpec = PromptSpec(),
                 generation: GenerationSpec = GenerationSpec(), capture: CaptureSpec = CaptureSpec(),
                 labels: dict[str, dict[str, Any]] | None = None, mode: str = "cached",
                 store_dir: str | None = None, store_root: str = "outputs/stores", batch_size: int = 4,
                 num_workers: int = 0, device: str = "auto", progress: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        self.diffusion, self.prompts, self.generation, self.capture = diffusion, prompts, generation, capture
        self.labels = dict(labels or {"foreground": {"name": "otsu"}})
        for task, cfg in self.labels.items():
            if not isinstance(cfg, dict) or "name" not in cfg:
                raise ValueError(f"data.labels.{task} must be a mapping with a 'name' (a labeler), got {cfg!r}")
        self.mode, self.store_dir, self.store_root = mode, store_dir, store_root
        self.batch_size, self.num_workers, self.device, self.progress = batch_size, num_workers, device, progress
        self.store: ActivationStore | None = None
        self.probe_spec: ProbeSpec | None = None
        self.datasets: dict[str, Dataset] = {}
        self.label_caches: dict[str, LabelCache] = {}
        #: labels of the decoded predicted-x0 images of the test split (generation.decode_x0)
        self.x0_label_caches: dict[str, LabelCache] = {}
        self.guided_calls = 0
        self._pipe = None
        #: set by one-pass (closed-form) modules: their train sums must see each image exactly once,
        #: so under DDP the train split is sharded without DistributedSampler's padding duplicates
        self.exact_train_shards = False

    @property
    def streaming(self) -> bool:
        return self.mode == "streaming"

    # -- config as data (for exports and evaluate.py) ------------------------------------
    def config(self) -> dict[str, Any]:
        return {"diffusion": asdict(self.diffusion), "prompts": asdict(self.prompts),
                "generation": asdict(self.generation), "capture": asdict(self.capture),
                "labels": self.labels, "mode": self.mode, "store_dir": str(self.resolved_store_dir()),
                "batch_size": self.batch_size, "num_workers": self.num_workers, "device": self.device}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> "ActivationDataModule":
        cfg = {**cfg, **overrides}
        return cls(diffusion=DiffusionSpec(**cfg["diffusion"]), prompts=PromptSpec(**cfg["prompts"]),
                   generation=GenerationSpec(**cfg["generation"]), capture=CaptureSpec(**cfg["capture"]),
                   labels=cfg["labels"], mode=cfg.get("mode", "cached"), store_dir=cfg.get("store_dir"),
                   batch_size=cfg.get("batch_size", 4), num_workers=cfg.get("num_workers", 0),
                   device=cfg.get("device", "auto"), progress=cfg.get("progress", True))

    def records(self) -> list[PromptRecord]:
        if not hasattr(self, "_records"):
            self._records = load_prompts(self.prompts)
        return self._records

    def resolved_store_dir(self) -> Path:
        if self.store_dir:
            return Path(self.store_dir).expanduser()
        request = store_request(self.diffusion, self.generation, self.capture, self.records(), not self.streaming)
        name = ("random-" if self.diffusion.is_random else "") + ("images-" if self.streaming else "")
        return Path(self.store_root) / f"{name}{request_fingerprint(request)}"

    def pipeline(self):
        """The diffusion pipeline (streaming mode keeps it loaded for the whole run)."""
        if self._pipe is None:
            self._pipe = load_pipeline(self.diffusion, self._device())
        return self._pipe

    # -- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fetch the prompt files (download + checksum); no state is kept."""
        load_prompts(self.prompts)

    def _dist(self) -> tuple[int, int, Callable[[], None]]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return 0, 1, lambda: None
        return trainer.global_rank, trainer.world_size, trainer.strategy.barrier

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.strategy.root_device.type != "cpu":
            return str(trainer.strategy.root_device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def setup(self, stage: str | None = None) -> None:
        if self.probe_spec is not None:
            return
        rank, world, barrier = self._dist()
        records = self.records()
        store_dir = self.resolved_store_dir()
        progress = self.progress and (rank == 0 or world > 1)
        if self.streaming:
            store, self._pipe = open_store(store_dir, records, self.diffusion, self.generation, self.capture,
                                           self._device(), rank, barrier, store_activations=False)
        else:
            store = ensure_store(store_dir, records, self.diffusion, self.generation, self.capture, self._device(),
                                 rank, world, barrier, progress)
        self.store = store
        for task, cfg in self.labels.items():
            cfg = dict(cfg)
            self.label_caches[task] = LabelCache(store, task, build_labeler(cfg.pop("name"), **cfg))
        splits = split_indices(records)
        empty = [s for s in ("train", "test") if not splits[s]]
        if empty:
            raise ValueError(f"the prompt set has no {' and no '.join(empty)} prompts; check data.prompts")
        if self.streaming:
            self.datasets = {s: StreamingDataset(self, s, idx) for s, idx in splits.items() if idx}
            stats: dict[str, dict[str, float]] = {}  # the one-pass probes measure them on the train stream
        else:
            for task, cache in self.label_caches.items():
                cache.ensure(shard_of(range(store.num_samples), self.generation.batch_size, rank, world),
                             device=self._device(), progress=progress)
            barrier()
            self.label_caches = {t: LabelCache(store, t, c.labeler) for t, c in self.label_caches.items()}
            if store.x0_images is not None:
                for task, cache in self.label_caches.items():
                    x0 = LabelCache(store, task, cache.labeler, source="x0")
                    x0.ensure(shard_of(splits["test"], self.generation.batch_size, rank, world), device=self._device(),
                              progress=progress)
                    self.x0_label_caches[task] = x0
                barrier()
                self.x0_label_caches = {t: LabelCache(store, t, c.labeler, "x0") for t, c in self.x0_label_caches.items()}
            self.datasets = {s: ActivationDataset(store, idx, self.label_caches) for s, idx in splits.items() if idx}
            stats = {t: target_stats(c.array(), splits["train"]) for t, c in self.label_caches.items()}
        cap = store.manifest["capture"]
        self.probe_spec = ProbeSpec(
            layers=[LayerInfo.from_dict(d) for d in cap["layers"]], steps=list(cap["steps"]),
            timesteps=list(cap["timesteps"]), tasks=list(self.labels),
            label_size=(store.manifest["generation"]["height"], store.manifest["generation"]["width"]),
            target_stats=stats, model=store.manifest["model"], is_random=bool(store.manifest["model"]["is_random"]),
            store_dir=str(store_dir), data_config=self.config(), streaming=self.streaming)

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"the prompt set has no {split!r} split (val needs prompts.val_fraction > 0)")
        ds = self.datasets[split]
        if isinstance(ds, StreamingDataset):
            return DataLoader(ds, batch_size=None, num_workers=0)
        rank, world, _ = self._dist()
        exact = not shuffle or self.exact_train_shards
        sampler = UnpaddedShardSampler(ds, world, rank) if world > 1 and exact else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, collate_fn=_collated)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=not self.exact_train_shards)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

    def teardown(self, stage: str | None = None) -> None:
        if stage in ("test", None):
            self._pipe = None  # free the model's memory once the last streamed split is done


def target_stats(labels: np.ndarray, indices: Sequence[int], chunk: int = 16) -> dict[str, float]:
    """Mean and std of the raw labels over the train split (all pixels), saved with the probes."""
    s = s2 = n = 0.0
    for k in range(0, len(indices), chunk):
        x = np.asarray(labels[list(indices[k:k + chunk])], dtype=np.float64)
        s, s2, n = s + x.sum(), s2 + (x * x).sum(), n + x.size
    mean = s / max(n, 1)
    std = float(np.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0)))
    return {"mean": float(mean), "std": std if std > 0 else 1.0}


