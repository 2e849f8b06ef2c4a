"""The LightningDataModule: wires the data stages, then serves train/val/test.

``prepare_data`` only fetches files (the prompt CSVs). ``setup`` calls the stages in order, each
a function of its own that runs without Lightning (e.g. from a SLURM array job), every rank on a
disjoint shard of whole batches: filling the store (:func:`probes.store.fill.ensure_store`:
generation, capture and the decoded intermediate images), labelling
(:func:`probes.labels.stage.label_store`), then the target statistics of the train split
(:func:`probes.training.target_stats.scan_caches`); it keeps what they return and builds the
splits and the :class:`~probes.contract.ProbeSpec` the probes are shaped by.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from probes.common.config_group import GroupFile
from probes.contract import ProbeSpec
from probes.diffusion.families.layers import check_patterns
from probes.diffusion.families.spec import get_family
from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.labels import stage as labels_stage
from probes.labels.cache import LabelCache
from probes.labels.stage import build_labelers, labeler_configs
from probes.prompts.sets import PromptRecord, PromptSpec, load_prompts, split_indices
from probes.replay.run import ReplaySpec, ensure_replay_store, replay_pipeline
from probes.replay.trajectory import StoreTrajectory
from probes.store.activations import ActivationStore, decoded_latent
from probes.store.disk import check_budget, label_bytes, planned_layout, records_split, store_bytes
from probes.store.fill import ensure_store, open_store, shard_of
from probes.store.manifest import request_fingerprint, store_request
from probes.tasks import check_target_norm, get_task, resolve_target_stats
from probes.training.datasets import (
    ActivationDataset,
    ReplayStream,
    StreamingDataset,
    StreamSource,
    UnpaddedShardSampler,
    collated,
)
from probes.training.finite import describe_sample
from probes.training.target_stats import scan_caches

log = logging.getLogger(__name__)


MODES = ("cached", "streaming")


def selects_on_validation(model: Any) -> bool:
    """Whether fitting ``model`` picks anything on the validation split (None: assume it does).

    One-pass ridge probes pick λ per head there, ``selection: best_val`` each head's epoch; SGD
    probes with ``selection: last`` (the reference's way) select nothing.
    """
    if model is None:
        return True
    if getattr(model, "one_pass", False):
        return bool(getattr(model, "selects_lambda", True))
    hparams = getattr(model, "hparams", None) or {}
    return hparams.get("selection", "last") != "last"


class ActivationDataModule(pl.LightningDataModule):
    """Prompts -> (generated, captured) activation store -> labels -> train/val/test loaders.

    :param diffusion: the model (``source: hub`` for SD v1.4 or another family's Hub id, ``random``
        for tiny/benchmarks); its family decides the layer names ``capture.layers`` may use
        (checked here, before any compute) and the samplers it runs.
    :param prompts: prompt set and splits.
    :param generation: sampler settings (K-LMS, 15 steps, guidance 7.5, 512x512 by default).
    :param capture: layers, steps, halves and dtype to capture.
    :param labels: task -> labeler, e.g. ``{foreground: {name: tracer}, depth: {name: midas}}``;
        the extra keys are the labeler's arguments. Or the path of a YAML file holding that
        mapping (a labels group, ``configs/labels/*.yaml``), read when the config is parsed so that a
        saved or printed config holds the mapping itself.
    :param decoded_labels: the labelers of the decoded intermediate images (``generation.decode``),
        per task, where they are not the labels' own (same forms as ``labels``). Default: each task's
        labels labeler, whose curve then ends at 1 by construction (its labels are its own output on
        the final image); the toy world's exact-label protocol names the pseudo-labelers here, so the
        decoded-image baseline is scored against the renderer's exact labels.
    :param mode: ``cached`` (activations written to the store, then read for as many epochs as
        needed: SGD probes) or ``streaming`` (nothing cached: each split is generated while it is
        consumed, for one-pass closed-form probes, ``probes.training.ridge.RidgeProbeModule``).
    :param store_dir: the activation store; default ``<store_root>/<fingerprint of the settings>``.
    :param store_root: parent of default store folders.
    :param batch_size: images per training batch (streaming: ``generation.batch_size``).
    :param num_workers: DataLoader workers (cached mode).
    :param device: where generation and labelers run: ``auto`` (the trainer's device, else CUDA
        when available), ``cpu`` or ``cuda[:k]``.
    :param progress: progress bars.
    :param exact_train_shards: each training image seen exactly once per epoch, also under DDP
        (no padding duplicates). One-pass (closed-form) probes need it; the CLI links it from
        ``model.one_pass``.
    :param target_norm: per regression task, how its targets are z-scored instead of with its own
        train-split statistics: another task's (``{shading: depth}``) or fixed constants
        (``{shading: {mean: 15.740597, std: 9.281932}}``, the replication's recipe); see
        ``probes.tasks.check_target_norm``.

    :param replay: a same-image control (``probes.replay``): the images, labels and recorded
        denoiser inputs are those of ``diffusion`` (the trained model's store, reused when it exists),
        the activations those of the U-Net ``replay`` names (``weights: permuted`` or ``random``) run on
        exactly those inputs. Needs ``capture.record_inputs: true``.

    Experiments that read this data (the classifier on decoded images) are callbacks of the
    trainer; one that has a ``check_data(dm)`` is asked, before any compute, whether it can run.
    """

    def __init__(self, diffusion: DiffusionSpec = DiffusionSpec(), prompts: PromptSpec = PromptSpec(),
                 generation: GenerationSpec = GenerationSpec(), capture: CaptureSpec = CaptureSpec(),
                 labels: dict[str, dict[str, Any]] | GroupFile | None = None, mode: str = "cached",
                 store_dir: str | None = None, store_root: str = "outputs/stores", batch_size: int = 4,
                 num_workers: int = 0, device: str = "auto", progress: bool = True,
                 exact_train_shards: bool = False, target_norm: dict[str, Any] | None = None,
                 replay: ReplaySpec | None = None,
                 decoded_labels: dict[str, dict[str, Any]] | GroupFile | None = None) -> None:
        super().__init__()
        if replay is not None and not capture.record_inputs:
            raise ValueError(f"data.replay ({replay.weights} U-Net on the trained model's trajectory) needs the "
                             f"trajectory: set data.capture.record_inputs: true")
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size!r} (images per training batch)")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers!r} (0: load in the main process)")
        self.diffusion, self.prompts, self.generation, self.capture = diffusion, prompts, generation, capture
        self.labels = labeler_configs(labels, "data.labels") or {"foreground": {"name": "otsu"}}
        #: the labelers of the decoded intermediate images, when not the labels' own (e.g. the toy
        #: pseudo-labelers on decoded renders, scored against the renderer's exact labels)
        self.decoded_labels = labeler_configs(decoded_labels, "data.decoded_labels")
        extra = sorted(set(self.decoded_labels) - set(self.labels))
        if extra:
            raise ValueError(f"data.decoded_labels names tasks {extra} that data.labels does not label "
                             f"({sorted(self.labels)}): a decoded image's labels are scored against the final "
                             f"image's labels of the same task")
        self.target_norm = check_target_norm(target_norm, tuple(self.labels))  # before any compute
        self.replay = replay
        family = get_family(diffusion.family_name)    # the layer names and the call depend on the model family
        generation.check_family(family)
        check_patterns(family, capture.layers)
        self.mode, self.store_dir, self.store_root = mode, store_dir, store_root
        self.batch_size, self.num_workers, self.device, self.progress = batch_size, num_workers, device, progress
        self.store: ActivationStore | None = None
        self.probe_spec: ProbeSpec | None = None
        self.datasets: dict[str, Dataset] = {}
        self.label_caches: dict[str, LabelCache] = {}
        #: per task, each sample's smallest and largest label value (cached mode): binary tasks whose
        #: train labels are all empty or all full are refused by the probe module
        self.label_ranges: dict[str, tuple[Any, Any]] = {}
        #: labels of the test split's decoded intermediate images (generation.decode: noisy or x0)
        self.decoded_label_caches: dict[str, LabelCache] = {}
        self._pipe = None
        self.exact_train_shards = exact_train_shards

    @property
    def streaming(self) -> bool:
        return self.mode == "streaming"

    @property
    def guided_calls(self) -> int:
        """Guided U-Net calls made by this run's streamed splits (cached runs: see the store)."""
        return sum(getattr(ds, "guided_calls", 0) for ds in self.datasets.values())

    # -- config as data (for exports and evaluate.py) ------------------------------------
    def config(self) -> dict[str, Any]:
        return {"diffusion": asdict(self.diffusion), "prompts": asdict(self.prompts),
                "generation": asdict(self.generation), "capture": asdict(self.capture),
                "labels": self.labels, "mode": self.mode, "store_dir": str(self.resolved_store_dir()),
                "batch_size": self.batch_size, "num_workers": self.num_workers, "device": self.device,
                "target_norm": self.target_norm, **({"replay": asdict(self.replay)} if self.replay else {}),
                **({"decoded_labels": self.decoded_labels} if self.decoded_labels else {})}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> ActivationDataModule:
        cfg = {**cfg, **overrides}
        return cls(diffusion=DiffusionSpec(**cfg["diffusion"]), prompts=PromptSpec(**cfg["prompts"]),
                   generation=GenerationSpec(**cfg["generation"]), capture=CaptureSpec(**cfg["capture"]),
                   labels=cfg["labels"], mode=cfg.get("mode", "cached"), store_dir=cfg.get("store_dir"),
                   store_root=cfg.get("store_root") or "outputs/stores",
                   batch_size=cfg.get("batch_size", 4), num_workers=cfg.get("num_workers", 0),
                   device=cfg.get("device", "auto"), progress=cfg.get("progress", True),
                   target_norm=cfg.get("target_norm"),
                   replay=ReplaySpec(**cfg["replay"]) if cfg.get("replay") else None,
                   decoded_labels=cfg.get("decoded_labels"))

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

    # -- checks before any compute -------------------------------------------------------
    def check_splits(self, stage: str | None = "fit", model: Any = None) -> None:
        """Refuse a prompt set without train or test prompts, and a fit that selects without validation prompts.

        Selection happens on the validation split, never on test: ``model.selection: best_val`` and
        the ridge λ need it, so such a fit without val prompts is refused here, before any compute
        (it would otherwise fail, or select on test, after hours of generation). A fit that selects
        nothing (SGD probes with ``selection: last``, the reference-exact configs that train on all
        246 images) runs without val; its report then picks no best (layer, step) and says so.
        ``model`` None (unknown) counts as selecting.
        """
        splits = split_indices(self.records())
        empty = [s for s in ("train", "test") if not splits[s]]
        if empty:
            raise ValueError(f"the prompt set has no {' and no '.join(empty)} prompts; check data.prompts "
                             f"(source={self.prompts.source!r}, limit={self.prompts.limit}, "
                             f"test_fraction={self.prompts.test_fraction})")
        if stage in ("fit", None) and not splits["val"] and selects_on_validation(model):
            raise ValueError(
                f"the prompt set has no validation prompts (data.prompts.val_fraction={self.prompts.val_fraction}, "
                f"{len(splits['train'])} train prompts): this model picks best_val weights or the ridge λ on the "
                f"validation split, never on test. Set data.prompts.val_fraction > 0 (e.g. 0.1), give the prompt "
                f"file a split column with some 'val' rows, or use SGD probes with model.init_args.selection: last "
                f"(nothing selected: configs/sd14/reference_exact.yaml).")

    def check_consumers(self, consumers: Any = ()) -> None:
        """Let the stages that read this data (callbacks with a ``check_data(dm)``, e.g. the classifier
        experiment) refuse what they cannot use, before any compute."""
        for consumer in consumers:
            check = getattr(consumer, "check_data", None)
            if callable(check):
                check(self)

    def disk_needs(self) -> list[tuple[str, int]] | None:
        """``(what, bytes)`` this run still writes under the store (activations, images, labels); None if unknown.

        Unknown only when the model's config is not cached yet (its weights are missing, which the
        pre-flight check reports).
        """
        records = self.records()
        test = records_split(records, "test")
        store_dir = self.resolved_store_dir()
        store = ActivationStore(store_dir) if (store_dir / "manifest.json").exists() else None
        if store is not None:
            layout, todo = store.manifest, store.missing()
        else:
            layout = planned_layout(self.diffusion, self.generation, self.capture, len(records), not self.streaming)
            if layout is None:
                return None
            todo = list(range(len(records)))
        h, w = layout["generation"]["height"], layout["generation"]["width"]
        what = "images" if self.streaming else "activations and images"
        needs = [(f"{what} of {len(todo)} samples", store_bytes(layout, todo, test))]
        decoded = decoded_latent(layout["generation"])
        labelers = build_labelers(self.labels)
        on_decoded = labels_stage.decoded_labelers_of(labelers, build_labelers(self.decoded_labels))
        for task, labeler in labelers.items():
            rows = LabelCache(store, task, labeler).missing(range(len(records))) if store is not None else records
            needs.append((f"{task} labels", label_bytes(len(rows), h, w)))
            if decoded != "none":
                dec = on_decoded[task]
                dec_rows = LabelCache(store, task, dec, "decoded").missing(test) if store is not None else test
                needs.append((f"{task} labels of decoded {decoded} images",
                              label_bytes(len(dec_rows), h, w, len(layout["capture"]["steps"]))))
        return needs

    def check_disk_budget(self) -> None:
        """Refuse, before generating, a disk that cannot hold the store *and* its label caches."""
        needs = self.disk_needs()
        if needs is not None:
            check_budget(needs, self.resolved_store_dir())

    def replay_pipe(self):
        """The pipeline whose U-Net a streamed same-image control replays (loaded once)."""
        if self._pipe is None:
            self._pipe = replay_pipeline(self.replay, self.diffusion, self._device())
        return self._pipe

    def pipeline(self):
        """The diffusion pipeline (streaming mode keeps it loaded for the whole run)."""
        if self._pipe is None:
            self._pipe = load_pipeline(self.diffusion, self._device())
        return self._pipe

    # -- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fetch the prompt files (download + checksum); no state is kept."""
        load_prompts(self.prompts)

    def dist(self) -> tuple[int, int, Callable[[], None]]:
        """``(rank, world, barrier)``: the trainer's when attached, else a single process."""
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
        rank, world, barrier = self.dist()
        records = self.records()
        trainer = getattr(self, "trainer", None)
        self.check_splits(stage, trainer.lightning_module if trainer is not None else None)  # before any compute
        self.check_consumers(getattr(trainer, "callbacks", None) or ())
        self.check_disk_budget()           # every rank (same answer): a rank that raised alone would hang a barrier
        store_dir = self.resolved_store_dir()
        progress = self.progress and (rank == 0 or world > 1)
        if self.replay is not None:    # the trained model's images, labels and trajectory, made if missing
            store = ensure_store(store_dir, records, self.diffusion, self.generation, self.capture, self._device(),
                                 rank, world, barrier, progress, store_activations=not self.streaming)
        elif self.streaming:
            store, self._pipe = open_store(store_dir, records, self.diffusion, self.generation, self.capture,
                                           self._device(), rank, barrier, store_activations=False)
        else:
            store = ensure_store(store_dir, records, self.diffusion, self.generation, self.capture, self._device(),
                                 rank, world, barrier, progress)
        self.store = store
        labelers = build_labelers(self.labels)
        decoded_labelers = build_labelers(self.decoded_labels)
        splits = split_indices(records)
        model = store.manifest["model"]
        if self.replay is not None:
            batch = self.generation.batch_size
            self.label_caches, self.decoded_label_caches = labels_stage.label_store(
                store, labelers, shard_of(range(store.num_samples), batch, rank, world),
                shard_of(splits["test"], batch, rank, world), self._device(), progress, barrier,
                decoded_labelers)
            stats, self.label_ranges = scan_caches(self.label_caches, store.num_samples, splits["train"],
                                                   lambda i: describe_sample(self, i))
            if self.streaming:
                source = StoreTrajectory(store)
                self.datasets = {s: ReplayStream(lambda: self.replay_pipe(), source, s, idx, store.layers, self.capture,
                                                 self.generation.steps, self.replay.batch_size or batch,
                                                 self.label_caches, lambda: self.dist()[:2], self.progress)
                                 for s, idx in splits.items() if idx}
                model = dict(model, replay=self.replay.identity(), replay_name=self.replay.name)
            else:
                self.store = ensure_replay_store(store, self.replay, self.diffusion, self.capture, batch,
                                                 self._device(), rank, world, barrier, progress)
                self.datasets = {s: ActivationDataset(self.store, idx, self.label_caches)
                                 for s, idx in splits.items() if idx}
                model, store_dir = self.store.manifest["model"], self.store.root
        elif self.streaming:   # labelled while streamed (the datasets fill the caches)
            self.label_caches = labels_stage.label_caches(store, labelers)
            self.decoded_label_caches = labels_stage.label_caches(
                store, labels_stage.decoded_labelers_of(labelers, decoded_labelers), "decoded")
            source = StreamSource(pipeline=self.pipeline, records=records, generation=self.generation,
                                  capture=self.capture, store=store, label_caches=self.label_caches,
                                  decoded_label_caches=self.decoded_label_caches, device=self._device,
                                  dist=lambda: self.dist()[:2], progress=self.progress)
            self.datasets = {s: StreamingDataset(source, s, idx) for s, idx in splits.items() if idx}
            stats: dict[str, dict[str, float]] = {}  # the one-pass probes measure them on the train stream
        else:
            batch = self.generation.batch_size
            self.label_caches, self.decoded_label_caches = labels_stage.label_store(
                store, labelers, shard_of(range(store.num_samples), batch, rank, world),
                shard_of(splits["test"], batch, rank, world), self._device(), progress, barrier,
                decoded_labelers)
            self.datasets = {s: ActivationDataset(store, idx, self.label_caches,
                                                  {i: describe_sample(self, i) for i in idx})
                             for s, idx in splits.items() if idx}
            stats, self.label_ranges = scan_caches(self.label_caches, store.num_samples, splits["train"],
                                                   lambda i: describe_sample(self, i))
        stats = resolve_target_stats(stats, self.target_norm)
        cap = store.manifest["capture"]
        self.probe_spec = ProbeSpec(
            layers=store.layers, steps=list(cap["steps"]),
            timesteps=list(cap["timesteps"]), tasks=list(self.labels),
            label_size=(store.manifest["generation"]["height"], store.manifest["generation"]["width"]),
            target_stats=stats, model=model, is_random=bool(store.manifest["model"]["is_random"]),
            store_dir=str(store_dir), data_config=self.config(), streaming=self.streaming,
            target_norm=self.target_norm,
            label_spaces={t: lab.space for t, lab in labelers.items()
                          if lab.space is not None and get_task(t).kind == "regression"})

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"the prompt set has no {split!r} split (val needs data.prompts.val_fraction > 0)")
        ds = self.datasets[split]
        if isinstance(ds, StreamingDataset):
            return DataLoader(ds, batch_size=None, num_workers=0)
        rank, world, _ = self.dist()
        exact = not shuffle or self.exact_train_shards
        sampler = UnpaddedShardSampler(ds, world, rank) if world > 1 and exact else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, collate_fn=collated)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=not self.exact_train_shards)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets and self.datasets:
            return []   # no val split (allowed when nothing is selected, see check_splits): Lightning skips validation
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

    def teardown(self, stage: str | None = None) -> None:
        if stage in ("test", None):
            self._pipe = None  # free the model's memory once the last streamed split is done
