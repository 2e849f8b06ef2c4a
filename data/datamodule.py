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
from torch.utils.data import DataLoader, Dataset

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
                  records: Sequence[PromptRecord]) -> dict[str, Any]:
    """What a store's content depends on; its hash names the default store folder."""
    gen = asdict(generation)
    gen.pop("batch_size")
    return {"model": diffusion.identity(), "generation": gen, "capture": asdict(capture),
            "prompts": prompts_fingerprint(records), "num_samples": len(records)}


def request_fingerprint(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_manifest(pipe, diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                   records: Sequence[PromptRecord]) -> dict[str, Any]:
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
    request = store_request(diffusion, generation, capture, records)
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
                    "dtype": capture.dtype, "hook": "attn1.to_out.0 output (before dropout and residual)"},
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


def ensure_store(store_dir: Path, records: Sequence[PromptRecord], diffusion: DiffusionSpec,
                 generation: GenerationSpec, capture: CaptureSpec, device: str, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None, progress: bool = True) -> ActivationStore:
    """Create the store if needed and generate the samples of this rank's shard that are missing."""
    pipe = None
    if rank == 0 and not (store_dir / "manifest.json").exists():
        pipe = load_pipeline(diffusion, device)
        manifest = build_manifest(pipe, diffusion, generation, capture, records)
        need = ActivationStore.required_bytes(manifest)
        log.info("activation store: %d samples x %d layers x %d steps need %s at %s", len(records),
                 len(manifest["capture"]["layers"]), len(manifest["capture"]["steps"]), human_bytes(need), store_dir)
        print(f"[store] {store_dir}: {len(records)} images, {len(manifest['capture']['layers'])} layers, "
              f"{len(manifest['capture']['steps'])} steps -> {human_bytes(need)} on disk", flush=True)
        ActivationStore.create(store_dir, manifest)
    barrier()
    store = ActivationStore(store_dir)
    expected = request_fingerprint(store_request(diffusion, generation, capture, records))
    if store.manifest["fingerprint"] != expected:
        old = store.manifest["request"]
        new = store_request(diffusion, generation, capture, records)
        diff = [k for k in new if old.get(k) != new[k]]
        raise ValueError(f"the store at {store_dir} was made with other settings (differs in: {', '.join(diff)}); "
                         f"use another data.store_dir (or leave it unset to get one per configuration)")
    todo = shard_of(store.missing(), generation.batch_size, rank, world)
    if todo:
        check_disk(store_dir, ActivationStore.required_bytes(store.manifest, len(todo)), f"generating {len(todo)} samples")
        if pipe is None:
            pipe = load_pipeline(diffusion, device)
        layers = [LayerInfo.from_dict(d) for d in store.manifest["capture"]["layers"]]
        for batch in generate(pipe, records, todo, generation, layers, capture, progress=progress,
                              desc=f"generating (rank {rank})" if world > 1 else "generating"):
            if batch.timesteps != store.manifest["capture"]["all_timesteps"]:
                raise RuntimeError(f"sampler visited timesteps {batch.timesteps}, the store expects "
                                   f"{store.manifest['capture']['all_timesteps']}")
            acts = {n: a.numpy() for n, a in batch.acts.items()}
            recs = [dict(asdict(records[i]), unet_calls_batch=batch.unet_calls, rank=rank) for i in batch.indices]
            store.write_batch(batch.indices, batch.images, acts, recs)
        store.close()
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


class ActivationDataModule(pl.LightningDataModule):
    """Prompts -> (generated, captured) activation store -> labels -> train/val/test loaders.

    :param diffusion: the model (``source: hub`` for SD v1.4, ``random`` for tiny/benchmarks).
    :param prompts: prompt set and splits.
    :param generation: sampler settings (K-LMS, 15 steps, guidance 7.5, 512x512 by default).
    :param capture: layers, steps, halves and dtype to capture.
    :param labels: task -> labeler, e.g. ``{foreground: {name: tracer}, depth: {name: midas}}``;
        the extra keys are the labeler's arguments.
    :param store_dir: the activation store; default ``<store_root>/<fingerprint of the settings>``.
    :param store_root: parent of default store folders.
    :param batch_size: images per training batch.
    :param num_workers: DataLoader workers.
    :param device: where generation and labelers run: ``auto`` (the trainer's device, else CUDA
        when available), ``cpu`` or ``cuda[:k]``.
    :param progress: progress bars.
    """

    def __init__(self, diffusion: DiffusionSpec = DiffusionSpec(), prompts: PromptSpec = PromptSpec(),
                 generation: GenerationSpec = GenerationSpec(), capture: CaptureSpec = CaptureSpec(),
                 labels: dict[str, dict[str, Any]] | None = None, store_dir: str | None = None,
                 store_root: str = "outputs/stores", batch_size: int = 4, num_workers: int = 0,
                 device: str = "auto", progress: bool = True) -> None:
        super().__init__()
        self.diffusion, self.prompts, self.generation, self.capture = diffusion, prompts, generation, capture
        self.labels = dict(labels or {"foreground": {"name": "otsu"}})
        for task, cfg in self.labels.items():
            if not isinstance(cfg, dict) or "name" not in cfg:
                raise ValueError(f"data.labels.{task} must be a mapping with a 'name' (a labeler), got {cfg!r}")
        self.store_dir, self.store_root = store_dir, store_root
        self.batch_size, self.num_workers, self.device, self.progress = batch_size, num_workers, device, progress
        self.store: ActivationStore | None = None
        self.probe_spec: ProbeSpec | None = None
        self.datasets: dict[str, ActivationDataset] = {}

    # -- config as data (for exports and evaluate.py) ------------------------------------
    def config(self) -> dict[str, Any]:
        return {"diffusion": asdict(self.diffusion), "prompts": asdict(self.prompts),
                "generation": asdict(self.generation), "capture": asdict(self.capture),
                "labels": self.labels, "store_dir": str(self.resolved_store_dir()), "batch_size": self.batch_size,
                "num_workers": self.num_workers, "device": self.device}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> "ActivationDataModule":
        cfg = {**cfg, **overrides}
        return cls(diffusion=DiffusionSpec(**cfg["diffusion"]), prompts=PromptSpec(**cfg["prompts"]),
                   generation=GenerationSpec(**cfg["generation"]), capture=CaptureSpec(**cfg["capture"]),
                   labels=cfg["labels"], store_dir=cfg.get("store_dir"), batch_size=cfg.get("batch_size", 4),
                   num_workers=cfg.get("num_workers", 0), device=cfg.get("device", "auto"),
                   progress=cfg.get("progress", True))

    def records(self) -> list[PromptRecord]:
        if not hasattr(self, "_records"):
            self._records = load_prompts(self.prompts)
        return self._records

    def resolved_store_dir(self) -> Path:
        if self.store_dir:
            return Path(self.store_dir).expanduser()
        request = store_request(self.diffusion, self.generation, self.capture, self.records())
        name = "random-" if self.diffusion.is_random else ""
        return Path(self.store_root) / f"{name}{request_fingerprint(request)}"

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
        progress = self.progress and rank == 0 or (self.progress and world > 1)
        self.store = store = ensure_store(store_dir, records, self.diffusion, self.generation, self.capture,
                                          self._device(), rank, world, barrier, progress)
        caches = {}
        for task, cfg in self.labels.items():
            cfg = dict(cfg)
            labeler = build_labeler(cfg.pop("name"), **cfg)
            cache = LabelCache(store, task, labeler)
            mine = shard_of(range(store.num_samples), self.generation.batch_size, rank, world)
            cache.ensure(mine, device=self._device(), progress=progress)
            caches[task] = cache
        barrier()
        caches = {t: LabelCache(store, t, c.labeler) for t, c in caches.items()}  # reopen after all ranks wrote
        splits = split_indices(records)
        empty = [s for s in ("train", "test") if not splits[s]]
        if empty:
            raise ValueError(f"the prompt set has no {' and no '.join(empty)} prompts; check data.prompts")
        self.datasets = {s: ActivationDataset(store, idx, caches) for s, idx in splits.items() if idx}
        stats = {t: target_stats(c.array(), splits["train"]) for t, c in caches.items()}
        cap = store.manifest["capture"]
        self.probe_spec = ProbeSpec(
            layers=[LayerInfo.from_dict(d) for d in cap["layers"]], steps=list(cap["steps"]),
            timesteps=list(cap["timesteps"]), tasks=list(self.labels),
            label_size=(store.manifest["generation"]["height"], store.manifest["generation"]["width"]),
            target_stats=stats, model=store.manifest["model"], is_random=bool(store.manifest["model"]["is_random"]),
            store_dir=str(store_dir), data_config=self.config())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"the prompt set has no {split!r} split (val needs prompts.val_fraction > 0)")
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def target_stats(labels: np.ndarray, indices: Sequence[int], chunk: int = 16) -> dict[str, float]:
    """Mean and std of the raw labels over the train split (all pixels), saved with the probes."""
    s = s2 = n = 0.0
    for k in range(0, len(indices), chunk):
        x = np.asarray(labels[list(indices[k:k + chunk])], dtype=np.float64)
        s, s2, n = s + x.sum(), s2 + (x * x).sum(), n + x.size
    mean = s / max(n, 1)
    std = float(np.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0)))
    return {"mean": float(mean), "std": std if std > 0 else 1.0}


