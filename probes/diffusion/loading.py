"""Model loading: a pipeline of any family from the Hugging Face cache, or one with random weights.

Three ways to get a pipeline, chosen in config (``data.diffusion``):
- ``source: hub``: ``<the family's pipeline class>.from_pretrained`` with revision, variant, dtype,
  cache dir and ``local_files_only`` (the real experiment; needs the weights). ``family`` (SD v1.x
  by default; :mod:`probes.diffusion.families`) picks the class: ``sd1``, ``sd2``, ``sdxl``,
  ``sd3``, ``pixart_alpha``, ``pixart_sigma``, ``flux``;
- ``source: random, architecture: sd14``: SD v1.4's exact architecture with random weights, for
  benchmarks (same cost as the real model);
- ``source: random, architecture: tiny`` (SD v1.4's topology with small widths, the demo's) or
  ``tiny_<family>`` (``data/architectures/families/``: every family's real classes with small
  widths), for the demo and the tests.
Random-weight models get tokenizers built offline (CLIP's from ``probes.diffusion.tokenizer``, a
tiny T5 one from :mod:`probes.diffusion.families.tiny`).

Two settings make a loaded pipeline behave as the reference's did (both default to the protocol):
``precision`` (:class:`Precision`: the reference kept fp32 weights and latents and ran under fp16
autocast on CUDA) and ``tokenizer`` (``reference``: transformers 4.22's slow CLIP tokenizer without
ftfy, see :mod:`probes.diffusion.tokenizer`). The resolved precision travels with the pipeline
(:func:`precision_of`), so the code that runs it reads it from there instead of guessing.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from probes.common.env import offline
from probes.common.hashing import sha256_text
from probes.paths import data_path, shipped_or_local

ARCH_DIR = data_path("architectures")

#: the commit a hub model is loaded at when ``diffusion.revision`` is not given: a moving ``main`` would let
#: a change upstream change the activations unseen. CompVis/stable-diffusion-v1-4: the snapshot its
#: ``main`` has resolved to since 2023 (the folder name of every current download's cache).
PINNED_REVISIONS = {"CompVis/stable-diffusion-v1-4": "133a221b8aa7292a167afc5127cb63fb5005638b"}

#: ``diffusion.precision`` values (see :class:`Precision`)
PRECISIONS = ("reference", "fp16", "bf16", "fp32")
#: ``diffusion.tokenizer`` values (see :mod:`probes.diffusion.tokenizer`)
TOKENIZERS = ("reference", "default")


@dataclass(frozen=True)
class Precision:
    """The numeric precision a pipeline runs in: its weights, its latents, and the autocast around it.

    ``diffusion.precision`` names one of these (:meth:`resolve`):

    =============  ==============  ==============  ===========================================
    precision      weights         latents         autocast
    =============  ==============  ==============  ===========================================
    ``reference``  float32         float32         float16 on CUDA (the reference's setting)
    ``fp16``       float16         float16         float16 on CUDA (half the memory, faster)
    ``bf16``       bfloat16        bfloat16        none
    ``fp32``       float32         float32         none
    =============  ==============  ==============  ===========================================

    On a CPU, ``reference`` and ``fp16`` run in plain float32 with no autocast (so they equal
    ``fp32``, as ``dtype: auto`` did before this option): float16 matrix products on a CPU are slow
    and partly unsupported, CPU autocast is a bfloat16 feature, and the CPU only serves tests and
    the toy model. ``bf16`` loads bfloat16 weights on any device.
    """

    name: str
    weights: torch.dtype
    latents: torch.dtype
    autocast: torch.dtype | None

    @classmethod
    def resolve(cls, name: str, device: torch.device | str) -> Precision:
        if name not in PRECISIONS:
            raise ValueError(f"diffusion.precision must be one of {' | '.join(PRECISIONS)}, got {name!r}")
        cuda = torch.device(device).type == "cuda"
        if name == "reference":
            return cls(name, torch.float32, torch.float32, torch.float16 if cuda else None)
        if name == "fp16":
            if not cuda:
                return cls(name, torch.float32, torch.float32, None)
            return cls(name, torch.float16, torch.float16, torch.float16)
        if name == "bf16":
            return cls(name, torch.bfloat16, torch.bfloat16, None)
        return cls(name, torch.float32, torch.float32, None)

    def autocast_context(self, device_type: str):
        """The autocast context the denoising loop runs under (a null context when there is none)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)


def precision_of(pipe: Any) -> Precision:
    """The precision :func:`load_pipeline` set on ``pipe``. A pipeline built elsewhere runs as
    before this option existed: latents in its denoiser's dtype, fp16 autocast on CUDA."""
    from probes.diffusion.families.spec import denoiser_of

    plan = getattr(pipe, "precision_plan", None)
    if plan is not None:
        return plan
    dtype, cuda = denoiser_of(pipe).dtype, torch.device(pipe.device).type == "cuda"
    return Precision("unset", dtype, dtype, torch.float16 if cuda else None)


@dataclass
class DiffusionSpec:
    """Which diffusion model to probe, and how to load it.

    :param source: ``hub`` (pretrained weights via ``from_pretrained``) or ``random``.
    :param model_id: Hub id or local folder of a diffusers pipeline (``source: hub``).
    :param family: the model family (:data:`probes.diffusion.families.spec.FAMILIES`: ``sd1``,
        ``sd2``, ``sdxl``, ``sd3``, ``pixart_alpha``, ``pixart_sigma``, ``flux``), which decides the
        pipeline class, the layer names and the call. ``None``: read off a random architecture
        (``tiny_<family>``) or a local folder's ``model_index.json``, else the Hub ids the family
        table names, else ``sd1`` (so configs written before families keep their meaning).
    :param revision: Hub revision (commit hash or branch); recorded in every output. Default: the pinned
        commit of a known model (:data:`PINNED_REVISIONS`), else ``main``; ``revision: main`` follows the
        moving branch on purpose.
    :param variant: weight file variant, e.g. ``fp16`` (smaller download; the weights are cast to
        ``precision``'s dtype after loading).
    :param architecture: for ``source: random``: ``sd14``, ``tiny``, ``tiny_<family>`` or a path to
        such a YAML.
    :param precision: ``reference`` (fp32 weights and latents, fp16 autocast on CUDA: the
        reference's), ``fp16``, ``bf16`` or ``fp32`` (no autocast); see :class:`Precision`.
    :param tokenizer: ``reference`` (the slow CLIP tokenizer of transformers 4.22 without ftfy, as
        the reference ran: BERT basic cleaning, accents stripped, punctuation split) or
        ``default`` (the installed transformers' CLIP tokenizer); see :mod:`probes.diffusion.tokenizer`.
        ``reference`` applies to a family's CLIP tokenizers; PixArt has none (T5 only) and refuses it.
    :param local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
    :param cache_dir: Hugging Face cache folder; default ``$HF_HOME/hub``.
    :param init_seed: seed of the random weights (``source: random``).
    :param permute_seed: if set, every denoiser (U-Net or transformer) weight tensor (parameters named ``*.weight``, norm
        layers' scales included) is permuted elementwise with this seed: the protocol's control,
        whose probes should fail.
    :param permute_biases: with ``permute_seed``, permute the biases too (the reference did not).
    :param dtype: deprecated (before ``precision`` existed): ``auto``/``float16`` mean ``fp16``,
        ``float32`` ``fp32``, ``bfloat16`` ``bf16``. A config that says it was written before
        ``tokenizer`` and ``permute_biases`` existed, so it keeps what it ran then: the installed
        tokenizer (``default``) and permuted biases, unless it sets them itself. Init-only: it never
        enters ``asdict`` (exports, configs).
    """

    source: str = "hub"
    model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    variant: str | None = None
    architecture: str = "sd14"
    precision: str = "reference"
    tokenizer: str = "reference"
    local_files_only: bool = False
    cache_dir: str | None = None
    init_seed: int = 0
    permute_seed: int | None = None
    permute_biases: bool = False
    family: str | None = None
    dtype: InitVar[str | None] = None

    def __post_init__(self, dtype: str | None = None) -> None:
        from probes.diffusion.families.spec import FAMILIES

        if self.source not in {"hub", "random"}:
            raise ValueError(f"diffusion.source must be 'hub' or 'random', got {self.source!r}")
        if self.revision is None and self.source == "hub":
            self.revision = PINNED_REVISIONS.get(self.model_id)
        if dtype is not None:
            self._from_legacy_dtype(dtype)
        if self.precision not in PRECISIONS:
            raise ValueError(f"diffusion.precision must be one of {' | '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"diffusion.tokenizer must be one of {' | '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"diffusion.family: unknown model family {self.family!r}; valid families: "
                             f"{', '.join(FAMILIES)}")
        if self.is_random and self.family is not None:
            arch = architecture_family(self.architecture)
            if arch != self.family:
                raise ValueError(f"diffusion.family={self.family!r} but diffusion.architecture={self.architecture!r} "
                                 f"is a {arch} architecture: drop diffusion.family, or use architecture tiny_{self.family}")
        family = FAMILIES[self.family_name]
        if self.tokenizer == "reference" and not family.clip_tokenizers:
            raise ValueError(f"diffusion.tokenizer=reference restores the reference's CLIP tokenisation; model family "
                             f"{family.name} has no CLIP tokenizer: set diffusion.tokenizer=default")

    @property
    def family_name(self) -> str:
        """The model family (see ``family``): as given, else read off the architecture, the local
        folder or the family table's Hub ids, else ``sd1``."""
        from probes.diffusion.families.spec import family_of_model_id

        if self.family is not None:
            return self.family
        if self.is_random:
            return architecture_family(self.architecture)
        local = local_model_dir(self.model_id)
        if local is not None and (local / "model_index.json").is_file():
            from probes.diffusion.families.loading import family_of_folder

            return family_of_folder(local).name
        known = family_of_model_id(self.model_id)
        return known.name if known is not None else "sd1"

    def _from_legacy_dtype(self, dtype: str) -> None:
        """Read a config (or probe export) written when ``dtype`` chose the weights' dtype."""
        legacy = {"auto": "fp16", "float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}
        if dtype not in legacy:
            raise ValueError(f"diffusion.dtype (deprecated) must be auto, float16, bfloat16 or float32; got "
                             f"{dtype!r}. Use diffusion.precision ({' | '.join(PRECISIONS)}) instead")
        if self.precision != "reference" and self.precision != legacy[dtype]:
            raise ValueError(f"diffusion.dtype={dtype!r} (deprecated) and diffusion.precision={self.precision!r} "
                             f"disagree: drop dtype and keep precision")
        warnings.warn(f"diffusion.dtype is deprecated: dtype: {dtype} reads as precision: {legacy[dtype]}; the "
                      f"protocol's is precision: reference (fp32 weights, fp16 autocast on CUDA)", FutureWarning,
                      stacklevel=4)
        self.precision = legacy[dtype]
        if self.tokenizer == "reference":
            self.tokenizer = "default"
        self.permute_biases = True

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def resolve_precision(self, device: torch.device | str) -> Precision:
        return Precision.resolve(self.precision, device)

    def torch_dtype(self, device: torch.device | str) -> torch.dtype:
        """The weights' dtype on ``device``."""
        return self.resolve_precision(device).weights

    def identity(self) -> dict[str, Any]:
        """What the activations depend on: written into the store manifest and every export.

        A setting is left out while it has the value every store had before it became an option
        (``precision: fp32`` (the CPU's), ``tokenizer: default``, biases permuted), so that those
        stores keep their fingerprints; any other value enters, and gives a store of its own.
        """
        if self.is_random:
            arch = load_architecture(self.architecture)
            ident = {"model_id": f"random:{arch['name']}", "revision": f"init_seed={self.init_seed}",
                     "architecture_sha256": sha256_text(yaml.safe_dump(arch, sort_keys=True), 16)}
        else:
            ident = {"model_id": self.model_id, "revision": self.revision or "main", "variant": self.variant}
            manifest = local_model_dir(self.model_id) / "MANIFEST.sha256" if local_model_dir(self.model_id) else None
            if manifest is not None and manifest.exists():    # a shipped or trained folder: its weights' checksums
                ident["revision"] = "sha256:" + sha256_text(manifest.read_text(), 16)
        ident["permute_seed"] = self.permute_seed
        if self.permute_seed is not None and not self.permute_biases:
            ident["permute"] = "weights"
        if self.precision != "fp32":
            ident["precision"] = self.precision
        if self.tokenizer != "default":
            ident["tokenizer"] = self.tokenizer
        if self.family_name != "sd1":           # SD v1.x stores keep their fingerprints
            ident["family"] = self.family_name
        return ident


def list_architectures() -> list[str]:
    return sorted(p.stem for p in [*ARCH_DIR.glob("*.yaml"), *ARCH_DIR.glob("families/tiny_*.yaml")])


def load_architecture(name_or_path: str) -> dict[str, Any]:
    """Component configs of an architecture shipped in ``data/architectures`` (SD v1.x: ``unet``,
    ``vae``, ``text_encoder``, ``scheduler`` sections) or ``data/architectures/families``
    (``tiny_<family>``: a ``family`` and its ``components``), or a YAML path in either format."""
    path = Path(name_or_path)
    if not path.suffix:
        path = ARCH_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            path = ARCH_DIR / "families" / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"unknown architecture {name_or_path!r}; shipped ones: {', '.join(list_architectures())} "
            f"(or give a path to a YAML with unet/vae/text_encoder/scheduler sections)")
    with open(path) as f:
        return yaml.safe_load(f)


def architecture_family(name_or_path: str) -> str:
    """The model family of a random architecture (``family:`` in its YAML; SD v1.x if it has none)."""
    return str(load_architecture(name_or_path).get("family", "sd1"))


def build_random_pipeline(architecture: str = "tiny", init_seed: int = 0):
    """A pipeline with random weights from shipped component configs (no download): SD v1.x's
    format, or a family's ``tiny_<family>`` (:func:`probes.diffusion.families.tiny.build_tiny_pipeline`)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from probes.diffusion.tokenizer import offline_clip_tokenizer

    arch = load_architecture(architecture)
    if "components" in arch:
        from probes.diffusion.families.tiny import build_tiny_pipeline

        return build_tiny_pipeline(arch, init_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    sched_cfg = {k: v for k, v in arch["scheduler"].items() if not k.startswith("_")}
    scheduler = PNDMScheduler.from_config(sched_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe


def load_hub_pipeline(spec: DiffusionSpec, dtype: torch.dtype):
    """``from_pretrained`` of the family's pipeline class with the options a cluster user needs
    (:func:`probes.diffusion.families.loading.load_family_pipeline`), and an error that says what to do."""
    from probes.diffusion.families.loading import FamilyMismatch, load_family_pipeline

    local_only = spec.local_files_only or offline()
    try:
        local = local_model_dir(spec.model_id)
        pipe = load_family_pipeline(local or spec.model_id, spec.family_name, dtype, spec.revision, spec.variant,
                                    spec.cache_dir, local_only)
        if "tokenizer" in pipe.components and getattr(pipe, "tokenizer", None) is None and \
                "tokenizer" in pipe_family(spec).clip_tokenizers:   # small local models may ship without one
            from probes.diffusion.tokenizer import offline_clip_tokenizer

            pipe.tokenizer = offline_clip_tokenizer()
        return pipe
    except FamilyMismatch:
        raise
    except (OSError, ValueError) as err:
        cache = spec.cache_dir or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        rev = f" --revision {spec.revision}" if spec.revision else ""
        raise RuntimeError(
            f"could not load {spec.model_id!r} (revision {spec.revision or 'main'}, model family {spec.family_name}) "
            f"from the Hugging Face cache at {cache} (local_files_only={local_only}): {err}\n"
            f"Fetch the weights on a machine with internet:  hf download {spec.model_id}{rev}"
            f"{' --cache-dir ' + spec.cache_dir if spec.cache_dir else ''}\n"
            f"then set HF_HOME (or data.diffusion.cache_dir) to that cache; or run the offline demo with "
            f"data.diffusion.source=random.") from err


def pipe_family(spec: DiffusionSpec):
    """The :class:`~probes.diffusion.families.spec.Family` of ``spec``."""
    from probes.diffusion.families.spec import get_family

    return get_family(spec.family_name)


def resolved_revision(pipe) -> str | None:
    """The snapshot commit the weights came from (Hub cache layout ``snapshots/<sha>/``), if known."""
    from probes.diffusion.families.spec import denoiser_of

    name = str(getattr(denoiser_of(pipe).config, "_name_or_path", ""))
    m = re.search(r"snapshots/([0-9a-f]{40})", name)
    return m.group(1) if m else None


def is_weight(name: str) -> bool:
    """A parameter the control permutes by default: a ``*.weight`` (linear, convolution, embedding
    and normalisation layers' scales alike), not a ``*.bias``."""
    return name.rsplit(".", 1)[-1] == "weight"


def permute_weights_(module: torch.nn.Module, seed: int, biases: bool = False) -> list[str]:
    """The protocol's control: permute each weight tensor's entries independently, in place.

    Every tensor keeps its values (so norms and statistics stay plausible) but loses its
    structure. The reference permuted the weight tensors only and left the biases as they were;
    ``biases=True`` permutes every parameter. Each tensor's permutation is seeded by (seed, name),
    so it does not depend on parameter order (nor on whether the biases are permuted). Returns the
    names of the permuted parameters.
    """
    done = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not (biases or is_weight(name)):
                continue
            done.append(name)
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(sha256_text(name, 16), 16) % 1_000_003)
            perm = torch.randperm(p.numel(), generator=g).to(p.device)
            p.copy_(p.reshape(-1)[perm].reshape(p.shape))
    return done


def local_model_dir(model_id: str) -> Path | None:
    """The folder a ``model_id`` names, if it is a local pipeline folder rather than a Hub id.

    ``data/...`` ids resolve against the project's data folder (e.g. ``data/toy/model``, the
    toy world's model), so configs work from any working directory.
    """
    path = shipped_or_local(model_id)
    return path if path.is_dir() else None


def load_pipeline(spec: DiffusionSpec, device: torch.device | str = "cpu"):
    """The configured pipeline on ``device``, with its progress bar off (we draw our own).

    The resolved :class:`Precision` is set on it as ``pipe.precision_plan`` (read it with
    :func:`precision_of`); with ``tokenizer: reference`` its tokenizer behaves as the reference's.
    """
    plan = spec.resolve_precision(device)
    dtype = plan.weights
    family = pipe_family(spec)
    if spec.is_random:
        pipe = build_random_pipeline(spec.architecture, spec.init_seed)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = load_hub_pipeline(spec, dtype)
    if spec.tokenizer == "reference":
        from probes.diffusion.tokenizer import use_reference_tokenisation_

        for attr in family.clip_tokenizers:
            use_reference_tokenisation_(getattr(pipe, attr))
    denoiser = getattr(pipe, family.denoiser)
    if spec.permute_seed is not None:
        permute_weights_(denoiser, spec.permute_seed, biases=spec.permute_biases)
    if family.is_unet:
        # PyTorch SDPA attention: fast, and it calls attn.to_out[0] as a module, so the capture hooks
        # fire (fused or xformers processors may bypass it; capture then fails loudly). The
        # transformers keep their own processors: their hooks sit on blocks and attention modules.
        from diffusers.models.attention_processor import AttnProcessor2_0

        denoiser.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.precision_plan = plan
    pipe.family = family.name
    pipe.native_scheduler = pipe.scheduler     # runs swap pipe.scheduler; samplers are built from this one
    return pipe

