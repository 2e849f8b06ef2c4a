"""What an intervention run works with, rebuilt from a probe export: model, prompts, labeler, probes.

The export records the data config its probes were trained on (``spec.data_config``): the model,
the prompt set and split, the sampler and the labelers. An intervention must regenerate exactly
those test (prompt, seed) pairs with that model and sampler, and re-label its images with the same
labeler, so everything here comes from that record; nothing is specific to one model's size
(image size, layers and token grids come from the export and the model).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from probes.diffusion.families.spec import denoiser_of, family_of
from probes.diffusion.loading import DiffusionSpec, load_pipeline, resolved_revision
from probes.experiments.intervention.editor import EditRecord, EditSettings
from probes.experiments.intervention.erasure import ConceptEraser, ErasingEditor
from probes.experiments.intervention.guidance import GuidanceSettings, LatentGuidance
from probes.experiments.intervention.pipeline import sample_images
from probes.export.probeset import LinearProbe, ProbeSet
from probes.generation.sampling import GenerationSpec, image_size
from probes.labels import build_labeler
from probes.labels.base import Labeler
from probes.prompts.sets import PromptRecord, PromptSpec, load_prompts

#: labelers that read stored label files instead of looking at the image: they cannot re-label an edit
NOT_IMAGE_LABELERS = ("files",)


#: what a store manifest's ``model`` records beside the model's identity
NOT_IDENTITY = ("resolved_revision", "is_random", "dtype")
OVERRIDE = "set allow_other_model: true (--allow_other_model true) to edit it anyway"


def _describe(model: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(model.items()) if k not in NOT_IDENTITY)


def check_same_model(probes: ProbeSet, diffusion: DiffusionSpec) -> None:
    """Refuse to edit a model the probes were not trained on: the model the export's data config would
    load must have the identity the probes' store recorded (model id, revision or init seed, permute
    seed, architecture fingerprint, precision, tokenizer). An export whose two records disagree was
    edited or assembled by hand; its edits would be meaningless (probes read another model's space)."""
    recorded = dict(probes.spec.model)
    trained = {k: v for k, v in recorded.items() if k not in NOT_IDENTITY}
    loading = diffusion.identity()
    if trained.get("revision") == "main" and recorded.get("resolved_revision") == loading.get("revision"):
        trained["revision"] = loading["revision"]     # "main" was that very commit when the store was made
    differ = sorted(k for k in set(trained) | set(loading) if trained.get(k, "absent") != loading.get(k, "absent"))
    if differ:
        parts = "; ".join(f"{k}: trained on {trained.get(k, 'absent')}, would load {loading.get(k, 'absent')}"
                          for k in differ)
        raise ValueError(f"the probes at {probes.path} were trained on the model ({_describe(trained)}), but the "
                         f"export's data config would load another one ({_describe(loading)}): {parts}. Use probes "
                         f"exported from a run of the model you want to edit, or {OVERRIDE}")


def check_loaded_model(probes: ProbeSet, pipe: Any) -> None:
    """The loaded model must be the one the probes saw: the commit the store resolved (hub models), and
    every probed U-Net layer's width (architecture)."""
    trained = dict(probes.spec.model).get("resolved_revision")
    loaded = resolved_revision(pipe)
    if trained and loaded and trained != loaded:
        raise ValueError(f"the probes at {probes.path} were trained on commit {trained} of "
                         f"{dict(probes.spec.model).get('model_id')}, the loaded model is commit {loaded}; pin "
                         f"diffusion.revision to {trained}, or {OVERRIDE}")
    for layer in probes.spec.layers:
        if layer.in_vae:
            continue
        try:
            width = getattr(denoiser_of(pipe).get_submodule(layer.module), "out_features", layer.channels)
        except AttributeError:
            raise ValueError(f"the probes at {probes.path} read layer {layer.name} ({layer.module}), which the loaded "
                             f"model does not have: another architecture; {OVERRIDE}") from None
        if width != layer.channels:
            raise ValueError(f"the probes at {probes.path} read {layer.channels} channels at layer {layer.name}, the "
                             f"loaded model has {width} there: another architecture; {OVERRIDE}")


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class InterventionSession:
    """The pipeline, the test records, the task's labeler and the export, loaded once.

    :param probes: the probe export.
    :param task: the task whose probes edit and whose labeler scores.
    :param device: where the model and labeler run (``auto``: CUDA when available).
    :param prompts_dir: local folder with the reference prompt CSVs (as ``evaluate.py``'s).
    :param pipe: an already loaded pipeline (tests; default: load the recorded model).
    :param labeler: an already built labeler (default: the recorded one for ``task``).
    :param allow_other_model: edit even when the model to load is not the one the probes were trained
        on (:func:`check_same_model`): another seed, revision or architecture.
    """

    def __init__(self, probes: ProbeSet, task: str, device: str = "auto", prompts_dir: str | None = None,
                 pipe=None, labeler: Labeler | None = None, allow_other_model: bool = False,
                 split: str = "test") -> None:
        self.probes, self.task, self.split = probes, task, split
        spec = probes.spec
        if task not in spec.tasks:
            raise KeyError(f"the export at {probes.path} has no probes for task {task!r}; its tasks: {list(spec.tasks)}")
        cfg = dict(spec.data_config)
        if not cfg:
            raise ValueError(f"the export at {probes.path} records no data config; re-export it with this version "
                             f"(python evaluate.py needs it too)")
        diffusion = DiffusionSpec(**dict(cfg["diffusion"]))
        if not allow_other_model:
            check_same_model(probes, diffusion)              # before the model is loaded
        self.device = resolve_device(device)
        self.generation = GenerationSpec(**dict(cfg["generation"]))
        prompts = dict(cfg["prompts"], **({"local_dir": prompts_dir} if prompts_dir else {}))
        self.records = [r for r in load_prompts(PromptSpec(**prompts)) if r.split == split]
        if not self.records:
            raise ValueError(f"the export's prompt set ({prompts.get('source')}) has no {split} prompts")
        self.pipe = pipe if pipe is not None else load_pipeline(diffusion, self.device)
        if not allow_other_model:
            check_loaded_model(probes, self.pipe)
        if labeler is None:
            label_cfg = dict(cfg["labels"][task])
            name = label_cfg.pop("name")
            if name in NOT_IMAGE_LABELERS:
                raise ValueError(f"the {task} labeler {name!r} reads stored labels, so it cannot re-label an edited "
                                 f"image; use an export whose labeler looks at the image")
            labeler = build_labeler(name, **label_cfg)
            labeler.load(self.device)
        self.labeler = labeler
        self.size = image_size(self.pipe, self.generation)
        if tuple(spec.label_size) != tuple(self.size):
            raise ValueError(f"the probes were trained on {tuple(spec.label_size)} labels but the recorded generation "
                             f"settings give {self.size} images")

    @property
    def guidance(self) -> bool:
        return self.cfg != "none"

    @property
    def cfg(self) -> str:
        """How the recorded generation lays out classifier-free guidance for this model's denoiser."""
        return self.generation.cfg_layout(family_of(self.pipe))

    def generate(self, records: Sequence[PromptRecord]) -> np.ndarray:
        """The unedited images of ``records`` (one pipeline call)."""
        return sample_images(self.pipe, records, self.generation)

    def edit(self, records: Sequence[PromptRecord], plan: Sequence[LinearProbe], targets: np.ndarray,
             settings: EditSettings, on_edit: Callable[[EditRecord], None] | None = None,
             erasers: Mapping[tuple[int, str], ConceptEraser] | None = None,
             measure: Callable[[tuple[int, str], Any, Any], list[float] | None] | None = None
             ) -> tuple[np.ndarray, list[EditRecord]]:
        """The images of ``records`` generated with the ``plan``'s edits towards ``targets`` [B, H, W]
        (with ``erasers``: each edit kept to the directions that move no erased concept; none or
        empty: the plain activation editor, bit for bit; ``measure``: each edit's per-image
        distribution shift, recorded on its :class:`EditRecord`)."""
        editor = ErasingEditor(denoiser_of(self.pipe), plan, self.probes.spec.layers,
                               torch.as_tensor(np.asarray(targets, np.float32)), settings, on_edit=on_edit,
                               erasers=erasers, cfg=self.cfg, measure=measure)
        images = sample_images(self.pipe, records, self.generation, [editor])
        return images, editor.records

    def guide(self, records: Sequence[PromptRecord], plan: Sequence[LinearProbe], targets: np.ndarray,
              settings: GuidanceSettings, on_edit: Callable[[EditRecord], None] | None = None
              ) -> tuple[np.ndarray, list[EditRecord]]:
        """The images of ``records`` generated with the latent guided towards ``targets`` at the
        ``plan``'s steps (latent mode: the U-Net redraws from a guided x_t, no activation replaced)."""
        guide = LatentGuidance(self.pipe, plan, self.probes.spec.layers,
                               torch.as_tensor(np.asarray(targets, np.float32)), settings,
                               guidance=self.guidance, on_edit=on_edit)
        images = sample_images(self.pipe, records, self.generation, [guide])
        return images, guide.records

    @property
    def has_classifier(self) -> bool:
        """Whether a shape classifier exists for this model's images: the toy world's (its labelers are
        ``toy_*``); Stable Diffusion images have none here."""
        return str(getattr(self.labeler, "name", "")).startswith("toy")

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Which toy shapes each image shows ``[B, K]`` bool (the toy classifier, probability > 0.5)."""
        if not self.has_classifier:
            raise ValueError(f"no shape classifier for images labelled by {getattr(self.labeler, 'name', '?')!r}; "
                             f"only the toy world has one")
        from probes.labels.toy_nets import predict

        return predict("classifier", images, getattr(self.labeler, "weights_dir", None)) > 0.5

    def label(self, images: np.ndarray, records: Sequence[PromptRecord]) -> np.ndarray:
        """Raw labels ``[B, H, W]`` (labeler units) of ``images``, checked against the probes' label size."""
        labels = np.asarray(self.labeler(images, np.asarray([r.index for r in records])), np.float32)
        if labels.shape != (len(images), *self.size):
            raise ValueError(f"labeler {self.labeler.name!r} returned {labels.shape}; expected "
                             f"{(len(images), *self.size)} (one map per image at the image size)")
        return labels
