"""One lens run: load the model (and its permuted-weights control), fill the embedding caches the
experiments need, and score them. Plots and reports are :mod:`probes.experiments.lens.report`'s job.

Order of work, chosen so the expensive part (U-Net passes) is done once per setting and the
cheap part (scores) can be redone freely:

1. the reference embeddings of every selected layer on the dataset (one U-Net pass per image);
2. semantic scores per (layer or combination, distance); the ranking picks the layers the
   sweeps follow (the best ``sweep_top`` single layers unless ``sweep_layers`` names them);
3. robustness: each transformation at each strength of its sweep, on the sweep layers;
4. timestep and denoising-step sweeps, on the sweep layers;
5. video: embeddings of every frame, scored per frame gap;
6. the control (permuted U-Net weights) repeats the experiments listed in
   ``control_experiments`` (by default only the semantic one, which is what the bar compares).
"""
from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.common.hashing import sha256_text
from probes.diffusion.loading import DiffusionSpec, load_pipeline, local_model_dir
from probes.experiments.lens import transforms as T
from probes.experiments.lens.datasets.common import LensItem
from probes.experiments.lens.datasets.toy import LENS_SEED, ToyVideos, ToyWorld
from probes.experiments.lens.distances import DEFAULT_DISTANCES, resolve
from probes.experiments.lens.embeddings import (
    EmbeddingCache,
    ObjectEmbeddings,
    PoolingSpec,
    cache_request,
    dataset_fingerprint,
)
from probes.experiments.lens.experiments import (
    COMBO_SEP,
    auto_combinations,
    distinct_layers,
    paired_rows,
    ranking,
    semantic_rows,
    video_rows,
)
from probes.experiments.lens.features import FeatureExtractor, FeatureSpec
from probes.toy.world import SHIPPED_WORLD

DATA_KINDS = ("toy", "coco", "voc", "davis", "toy_video")
EXPERIMENTS = ("semantic", "robustness", "timestep", "steps", "video")


@dataclass
class DataSpec:
    """Which images (or videos) the lens reads. One spec for every source; unused fields are ignored.

    :param kind: ``toy`` (rendered scenes), ``coco``, ``voc``, ``davis`` (videos) or ``toy_video``.
    :param root: dataset folder (COCO: the folder with ``annotations/`` and the image folders;
        VOC: ``VOCdevkit/VOC2012``; DAVIS: the ``DAVIS`` folder).
    :param split: ``val2017`` (COCO), ``val`` (VOC, DAVIS), ...
    :param limit: use only the first ``limit`` images (videos: sequences); the O(N^2) scores and
        the run time grow with it.
    :param annotation_file: COCO: another annotation file than ``annotations/instances_<split>.json``.
    :param image_dir: COCO: another image folder than ``<root>/<split>``.
    :param category_ids: COCO: keep only these categories.
    :param min_area: COCO: drop instances smaller than this many pixels.
    :param resolution: DAVIS: ``480p`` or ``Full-Resolution``.
    :param year: DAVIS: ``2017``.
    :param n: toy: number of scenes (``toy_video``: sequences).
    :param seed: toy: scene seed (default :data:`~probes.experiments.lens.datasets.toy.LENS_SEED`).
    :param size: toy: image side (the toy model's is 64).
    :param class_by: toy: ``shape``, ``colour`` or ``shape_colour``.
    :param min_pixels: toy: smaller visible objects are ignored.
    :param frames: toy_video: frames per sequence.
    :param motion: toy_video: ``camera`` (orbit) or ``object`` (the first object slides).
    :param step: toy_video: degrees (camera) or world units (object) per frame.
    :param world: toy: the toy world drawn (``v1``, ``v2``); default the shipped model's.
    """

    kind: str = "toy"
    root: str | None = None
    split: str | None = None
    limit: int | None = None
    annotation_file: str | None = None
    image_dir: str | None = None
    category_ids: list[int] | None = None
    min_area: int = 0
    resolution: str = "480p"
    year: str = "2017"
    n: int = 200
    seed: int = LENS_SEED
    size: int = 64
    class_by: str = "shape"
    min_pixels: int = 16
    frames: int = 8
    motion: str = "camera"
    step: float = 8.0
    world: str = SHIPPED_WORLD

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        if self.kind in ("coco", "voc", "davis") and not self.root:
            raise ValueError(f"data.kind={self.kind} needs data.root (the dataset folder; it cannot be "
                             f"downloaded by this tool: fetch it and point root at it)")

    @property
    def is_video(self) -> bool:
        return self.kind in ("davis", "toy_video")

    def relevant(self) -> dict[str, Any]:
        """The fields this kind of dataset uses (what reports print)."""
        used = {"toy": ("n", "seed", "size", "class_by", "min_pixels", "world"),
                "toy_video": ("n", "frames", "motion", "step", "seed", "size", "class_by", "min_pixels", "world"),
                "coco": ("root", "split", "annotation_file", "image_dir", "category_ids", "min_area"),
                "voc": ("root", "split"), "davis": ("root", "split", "resolution", "year")}[self.kind]
        return {"kind": self.kind, **{k: getattr(self, k) for k in (*used, "limit") if getattr(self, k) is not None}}


class Subset:
    """The first ``limit`` items of an indexable dataset, keeping its class names and identity."""

    def __init__(self, dataset: Any, limit: int) -> None:
        self.dataset, self.limit = dataset, min(limit, len(dataset))
        self.class_names = getattr(dataset, "class_names", None)

    def fingerprint(self) -> dict[str, Any]:
        return {**dataset_fingerprint(self.dataset), "limit": self.limit}

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> LensItem:
        if not 0 <= index < self.limit:
            raise IndexError(index)
        return self.dataset[index]

    def __iter__(self) -> Iterator[LensItem]:
        return (self.dataset[i] for i in range(self.limit))


def build_dataset(spec: DataSpec) -> Any:
    """The dataset object of a spec (images: indexable; videos: ``sequences`` + ``frames()``)."""
    from probes.experiments.lens.datasets import CocoInstances, DavisSequences, VocInstances

    if spec.kind == "toy":
        return ToyWorld(spec.n if spec.limit is None else min(spec.n, spec.limit), spec.seed, spec.size,
                        spec.class_by, spec.min_pixels, world=spec.world)
    if spec.kind == "toy_video":
        return ToyVideos(spec.n if spec.limit is None else min(spec.n, spec.limit), spec.frames, spec.motion,
                         spec.step, spec.seed, spec.size, spec.class_by, spec.min_pixels, world=spec.world)
    if spec.kind == "coco":
        ds = CocoInstances(spec.root, spec.split or "val2017", spec.annotation_file, spec.image_dir,
                           spec.category_ids, spec.min_area)
    elif spec.kind == "voc":
        ds = VocInstances(spec.root, spec.split or "val")
    else:
        ds = DavisSequences(spec.root, spec.split or "val", spec.resolution, spec.year)
        if spec.limit is not None:
            ds.sequences = ds.sequences[:spec.limit]
        return ds
    return Subset(ds, spec.limit) if spec.limit is not None else ds


def count_items(dataset: Any) -> int:
    """Number of items (video datasets: annotated frames over all sequences), without loading images."""
    if isinstance(dataset, ToyVideos):
        return len(dataset.sequences) * dataset.n_frames
    if hasattr(dataset, "frames"):                       # DAVIS: frames that have an annotation
        return sum(1 for s in dataset.sequences for jpg in sorted((dataset.images / s).glob("*.jpg"))
                   if (dataset.annotations / s / f"{jpg.stem}.png").exists())
    return len(dataset)


@dataclass
class ExperimentSpec:
    """Which experiments run, and their sweeps.

    :param run: experiments to run, any of ``semantic, robustness, timestep, steps, video``.
    :param distances: distance names (:mod:`probes.experiments.lens.distances`; any scipy metric).
    :param primary_distance: the distance that ranks layers and picks the sweep layers.
    :param k: neighbours of the k-NN class vote.
    :param combinations: layer combinations to score, as ``"a+b"`` (concatenated, each layer
        L2-normalised).
    :param auto_combinations: also score every pair (and the union) of this many best single layers.
    :param sweep_layers: layers (or ``a+b`` combinations) the sweeps follow; default: the
        ``sweep_top`` best single layers of the semantic ranking.
    :param sweep_top: see ``sweep_layers``.
    :param transforms: transformations of the robustness experiment (:data:`probes.experiments.lens.transforms.TRANSFORMS`).
    :param strengths: per transformation, strengths replacing its default sweep.
    :param timesteps: feature timesteps of the t sweep (the reference is ``features.timestep``).
    :param denoise_steps: numbers of DDIM steps of the step sweep, each from ``features.denoise_from``
        down to ``features.timestep`` (the reference is 0: noised straight to ``timestep``).
    :param video_max_gap: largest frame gap scored (default: the longest sequence).
    :param control_experiments: experiments repeated on the permuted-weights control.
    :param tsne_layers: embedding maps for this many best single layers (0: none).
    """

    run: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    distances: list[str] = field(default_factory=lambda: list(DEFAULT_DISTANCES))
    primary_distance: str = "cosine"
    k: int = 1
    combinations: list[str] = field(default_factory=list)
    auto_combinations: int = 3
    sweep_layers: list[str] | None = None
    sweep_top: int = 3
    transforms: list[str] = field(default_factory=lambda: list(T.TRANSFORMS))
    strengths: dict[str, list[float]] = field(default_factory=dict)
    timesteps: list[int] = field(default_factory=lambda: [0, 50, 100, 200, 400, 600, 800])
    denoise_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    video_max_gap: int | None = None
    control_experiments: list[str] = field(default_factory=lambda: ["semantic"])
    tsne_layers: int = 4

    def __post_init__(self) -> None:
        for name, values in (("run", self.run), ("control_experiments", self.control_experiments)):
            bad = [e for e in values if e not in EXPERIMENTS]
            if bad:
                raise ValueError(f"experiments.{name}: unknown experiments {bad}; valid: {', '.join(EXPERIMENTS)}")
        for d in [*self.distances, self.primary_distance]:
            resolve(d)
        if self.primary_distance not in self.distances:
            raise ValueError(f"experiments.primary_distance {self.primary_distance!r} must be one of "
                             f"experiments.distances {self.distances}")
        for name in [*self.transforms, *self.strengths]:
            T.get(name)
        if any(k < 0 for k in self.denoise_steps):
            raise ValueError(f"experiments.denoise_steps must be >= 0, got {self.denoise_steps}")

    def sweep_of(self, transform: str) -> list[float]:
        return list(self.strengths.get(transform, T.get(transform).sweep))


def singles(names: Iterable[str]) -> list[str]:
    """The single layers a list of layers and ``a+b`` combinations needs, in first-seen order."""
    return list(dict.fromkeys(p for n in names for p in n.split(COMBO_SEP)))


class LensRunner:
    """The experiments of one model (or its control) on one dataset (and optionally videos).

    :param pipe: the loaded pipeline.
    :param model_identity: ``DiffusionSpec.identity()`` of that pipeline (goes into cache manifests).
    :param label: the model's name in the rows (``model``, ``control``, ...).
    """

    def __init__(self, pipe: Any, model_identity: dict[str, Any], label: str, features: FeatureSpec,
                 pooling: PoolingSpec, experiments: ExperimentSpec, cache_root: str | Path,
                 progress: bool = True) -> None:
        self.pipe, self.identity, self.label = pipe, model_identity, label
        self.features, self.pooling, self.spec = features, pooling, experiments
        self.cache_root, self.progress = Path(cache_root), progress
        self.extractor = FeatureExtractor(pipe, features)
        self.layers = [l.name for l in self.extractor.layers]

    # -- caches ----------------------------------------------------------------------------------
    def embeddings(self, dataset: Any, layers: list[str] | None = None, features: FeatureSpec | None = None,
                   variant: dict[str, Any] | None = None, transform: Any = None, desc: str = "") -> ObjectEmbeddings:
        """The objects of ``dataset`` under one setting, from the cache (filled where missing)."""
        fspec = replace(features or self.features, layers=list(layers or self.layers))
        extractor = FeatureExtractor(self.pipe, fspec) if (features or layers) else self.extractor
        request = cache_request(self.identity, extractor.layers, dict(fspec.identity(), image_size=extractor.size),
                                self.pooling, dataset_fingerprint(dataset), variant, count_items(dataset))
        cache = EmbeddingCache.open_or_create(self.cache_root, request)
        cache.fill(iter(dataset), extractor.extract, transform, fspec.batch_size,
                   desc=f"{self.label}: {desc or 'embeddings'}", progress=self.progress)
        objects = cache.load()
        cache.close()
        return objects

    # -- experiments -----------------------------------------------------------------------------
    def semantic(self, reference: ObjectEmbeddings, combos: list[str] | None = None
                 ) -> tuple[list[dict], list[str], list[str]]:
        """Scores of every single layer, then of the combinations (``combos``, default: the
        configured ones and those of the best distinct layers); returns rows, the ranking (best
        first) and the combinations scored."""
        spec = self.spec
        rows = semantic_rows(reference, self.layers, spec.distances, spec.k, self.label)
        ranked = distinct_layers(reference, [n for n, _ in ranking(rows, spec.primary_distance, model=self.label)])
        if combos is None:
            combos = list(dict.fromkeys([*spec.combinations, *auto_combinations(ranked, spec.auto_combinations)]))
        missing = [p for c in combos for p in c.split(COMBO_SEP) if p not in self.layers]
        if missing:
            raise ValueError(f"experiments.combinations name layers that were not extracted: {missing}; "
                             f"extracted: {', '.join(self.layers)}")
        if combos:
            rows += semantic_rows(reference, combos, spec.distances, spec.k, self.label)
        return rows, [n for n, _ in ranking(rows, spec.primary_distance, model=self.label)], combos

    def sweep_layers(self, ranked: list[str], reference: ObjectEmbeddings) -> list[str]:
        """The configured sweep layers, else the best ``sweep_top`` distinct single layers."""
        if self.spec.sweep_layers:
            missing = [p for p in singles(self.spec.sweep_layers) if p not in self.layers]
            if missing:
                raise ValueError(f"experiments.sweep_layers name layers that were not extracted: {missing}; "
                                 f"extracted: {', '.join(self.layers)}")
            return list(self.spec.sweep_layers)
        return distinct_layers(reference, [n for n in ranked if COMBO_SEP not in n])[:self.spec.sweep_top]

    def robustness(self, dataset: Any, reference: ObjectEmbeddings, layers: list[str]) -> list[dict]:
        rows = []
        need = singles(layers)
        for name in self.spec.transforms:
            t = T.get(name)
            for strength in self.spec.sweep_of(name):
                if strength == t.identity:
                    variant = reference
                else:
                    variant = self.embeddings(dataset, need, variant={"transform": name, "strength": strength},
                                              transform=partial(_apply, t, strength), desc=f"{name} {strength:g}")
                rows += paired_rows(reference, variant, layers, self.spec.distances, self.label, "robustness",
                                    name, strength, self.spec.k)
        return rows

    def timestep_sweep(self, dataset: Any, reference: ObjectEmbeddings, layers: list[str]) -> list[dict]:
        rows, need = [], singles(layers)
        for t in self.spec.timesteps:
            variant = reference if t == self.features.timestep else self.embeddings(
                dataset, need, features=replace(self.features, timestep=t, denoise_steps=0), desc=f"t={t}")
            rows += paired_rows(reference, variant, layers, self.spec.distances, self.label, "timestep", "t", t,
                                self.spec.k)
        return rows

    def steps_sweep(self, dataset: Any, reference: ObjectEmbeddings, layers: list[str]) -> list[dict]:
        rows, need = [], singles(layers)
        for k in self.spec.denoise_steps:
            variant = reference if k == 0 else self.embeddings(
                dataset, need, features=replace(self.features, denoise_steps=k), desc=f"{k} steps")
            rows += paired_rows(reference, variant, layers, self.spec.distances, self.label, "steps", "steps", k,
                                self.spec.k)
        return rows

    def video(self, videos: Any, layers: list[str]) -> tuple[list[dict], ObjectEmbeddings]:
        objects = self.embeddings(videos, singles(layers), desc="video frames")
        return video_rows(objects, layers, self.spec.distances, self.label, self.spec.video_max_gap), objects


def _apply(t: T.Transform, strength: float, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return t(image, mask, strength)


@dataclass
class LensResult:
    """Everything the report needs: rows, rankings, sweep layers and the embeddings for the maps."""

    rows: list[dict] = field(default_factory=list)
    ranked: dict[str, list[str]] = field(default_factory=dict)           # model label -> ranking
    sweep_layers: list[str] = field(default_factory=list)
    reference: dict[str, ObjectEmbeddings] = field(default_factory=dict)  # model label -> objects
    class_names: dict[int, str] | None = None
    layer_info: list[dict] = field(default_factory=list)
    first_at_16: dict[str, str] = field(default_factory=dict)
    combinations: list[str] = field(default_factory=list)                # scored for every model alike

    @property
    def layer_order(self) -> list[str]:
        """Single layers in forward order (plots list layers this way)."""
        return [d["name"] for d in self.layer_info]


def model_identity(spec: DiffusionSpec) -> dict[str, Any]:
    """``spec.identity()``, plus, for a model in a local folder (the toy model), a fingerprint of
    its weight files (names, sizes, modification times): a folder without a ``MANIFEST.sha256``
    says nothing about which weights are in it, and a retrained model must not reuse the old
    model's cached embeddings."""
    ident = spec.identity()
    folder = None if spec.is_random else local_model_dir(spec.model_id)
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        stamp = "\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        ident["local_weights"] = sha256_text(stamp, 16)
    return ident


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_model(pipe: Any, identity: dict[str, Any], label: str, experiments: list[str], dataset: Any,
              videos: Any | None, features: FeatureSpec, pooling: PoolingSpec, spec: ExperimentSpec,
              cache_root: str | Path, result: LensResult, progress: bool = True,
              sweep_layers: list[str] | None = None) -> None:
    """Run ``experiments`` for one model into ``result`` (rows appended, ranking recorded)."""
    runner = LensRunner(pipe, identity, label, features, pooling, spec, cache_root, progress)
    reference = runner.embeddings(dataset, desc="reference")
    result.reference[label] = reference
    if not result.layer_info:
        result.layer_info = [l.to_dict() | {"kind": l.kind} for l in runner.extractor.layers]
    ranked: list[str] = []
    if "semantic" in experiments or sweep_layers is None:
        rows, ranked, combos = runner.semantic(reference, result.combinations or None)
        if "semantic" in experiments:
            result.rows += rows
        result.ranked[label] = ranked
        result.combinations = result.combinations or combos
    layers = sweep_layers or runner.sweep_layers(ranked, reference)
    if "robustness" in experiments:
        result.rows += runner.robustness(dataset, reference, layers)
    if "timestep" in experiments:
        result.rows += runner.timestep_sweep(dataset, reference, layers)
    if "steps" in experiments:
        result.rows += runner.steps_sweep(dataset, reference, layers)
    if "video" in experiments and videos is not None:
        rows, _ = runner.video(videos, layers)
        result.rows += rows
    if not result.sweep_layers:
        result.sweep_layers = layers


def run_lens(diffusion: DiffusionSpec, data: DataSpec, video: DataSpec | None, features: FeatureSpec,
             pooling: PoolingSpec, experiments: ExperimentSpec, cache_root: str | Path, device: str = "auto",
             control_permute_seed: int | None = 0, labels: tuple[str, str] = ("model", "control"),
             progress: bool = True) -> LensResult:
    """The model's experiments, then its permuted-weights control's (see the module docstring)."""
    from probes.diffusion.families.layers import check_patterns
    from probes.diffusion.families.spec import get_family
    from probes.diffusion.layers import first_at_grid
    from probes.experiments.lens.features import lens_kinds, lens_registry

    family = get_family(diffusion.family_name)
    check_patterns(family, features.layers, kinds=lens_kinds(family), option="features.layers")
    if data.is_video:
        raise ValueError(f"data.kind={data.kind} is a video dataset; put it under `video:` and give `data:` an "
                         f"image dataset (toy, coco or voc)")
    if video is not None and not video.is_video:
        raise ValueError(f"video.kind must be davis or toy_video, got {video.kind!r}")
    dataset = build_dataset(data)
    videos = build_dataset(video) if video is not None and "video" in experiments.run else None
    device = resolve_device(device)
    result = LensResult(class_names=getattr(dataset, "class_names", None))
    pipe = load_pipeline(diffusion, device)
    try:
        ext = FeatureExtractor(pipe, features)
        result.first_at_16 = first_at_grid(lens_registry(pipe, ext.latent_hw), (16, 16))
        run_model(pipe, model_identity(diffusion), labels[0], experiments.run, dataset, videos, features, pooling,
                  experiments, cache_root, result, progress)
    finally:
        del pipe
        gc.collect()
    if control_permute_seed is not None and experiments.control_experiments:
        control = replace(diffusion, permute_seed=control_permute_seed)
        pipe = load_pipeline(control, device)
        try:
            run_model(pipe, model_identity(control), labels[1], experiments.control_experiments, dataset, videos,
                      features, pooling, experiments, cache_root, result, progress,
                      sweep_layers=result.sweep_layers)
        finally:
            del pipe
            gc.collect()
    return result
