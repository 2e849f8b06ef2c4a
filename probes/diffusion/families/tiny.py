"""Tiny random-weight pipelines of every family, built offline from each model class's own config.

As diffusers' own tests do, every component is its real class (``UNet2DConditionModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``CLIPTextModelWithProjection``,
``T5EncoderModel``, ``FlowMatchEulerDiscreteScheduler`` ...) built from a small config, so the stock
pipeline runs the real code paths: joint attention, packing, v-prediction, added time ids, flow
matching. The configs live in ``data/architectures/families/tiny_<family>.yaml``; a pipeline is
saved as a local folder with ``save_pretrained`` and read back by the same ``from_pretrained`` the
real models go through (:func:`probes.diffusion.families.loading.load_family_pipeline`). A config
names one as ``diffusion: {source: random, architecture: tiny_<family>}``
(:func:`probes.diffusion.loading.build_random_pipeline` builds it here).

Tokenizers the Hub would provide are built offline: CLIP's from open_clip's bundled BPE vocabulary
(:func:`probes.diffusion.tokenizer.offline_clip_tokenizer`; SD 2.x's and SDXL's second tokenizer pad
with ``!``, set per component in the YAML), and a tiny T5 tokenizer: transformers'
``T5Tokenizer`` over a ``tokenizers`` Unigram model of single characters and word-initial
characters (a ``WordLevel`` model does not survive ``save_pretrained``/``from_pretrained`` in
transformers 5; a Unigram one does, and ``sentencepiece`` is not needed).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
import yaml

from probes.diffusion.families.spec import get_family
from probes.paths import data_path

FAMILY_ARCH_DIR = data_path("architectures") / "families"
#: transformers model class -> its config class
_TEXT_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                 "T5EncoderModel": "T5Config"}


def list_tiny() -> list[str]:
    """Families with a tiny config (``tiny_<family>.yaml``)."""
    return sorted(p.stem[len("tiny_"):] for p in FAMILY_ARCH_DIR.glob("tiny_*.yaml"))


def tiny_architecture(family_or_path: str) -> dict[str, Any]:
    """The tiny architecture of a family (or a YAML path in the same format)."""
    path = Path(family_or_path)
    if path.suffix not in (".yaml", ".yml"):
        get_family(family_or_path)                    # a misspelt family fails with the valid names
        path = FAMILY_ARCH_DIR / f"tiny_{family_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no tiny architecture at {path}; shipped: {', '.join(list_tiny())}")
    with open(path) as f:
        return yaml.safe_load(f)


def t5_vocabulary() -> list[tuple[str, float]]:
    """Pieces and log-probabilities of the tiny T5 tokenizer: T5's special tokens at T5's ids (pad 0,
    eos 1, unk 2), the word separator, then every printable ASCII character with and without the
    word-start marker (any English prompt tokenises without ``<unk>``)."""
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
            + [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars])


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram over :func:`t5_vocabulary`, no sentinel tokens) built offline."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0)


def _tokenizer(spec: dict[str, Any]):
    kind = spec["class"]
    if kind == "clip":
        from probes.diffusion.tokenizer import offline_clip_tokenizer

        tok = offline_clip_tokenizer()
        if spec.get("pad_token"):
            tok.pad_token = spec["pad_token"]
        return tok
    if kind == "t5":
        return tiny_t5_tokenizer()
    raise ValueError(f"unknown tokenizer class {kind!r} in a tiny architecture; valid: clip, t5")


def _component(name: str, spec: dict[str, Any]):
    import diffusers
    import transformers

    cls_name, cfg = spec["class"], dict(spec.get("config") or {})
    if cls_name in _TEXT_CONFIGS:
        config = getattr(transformers, _TEXT_CONFIGS[cls_name])(**cfg)
        return getattr(transformers, cls_name)(config)
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"component {name}: {cls_name!r} is neither a diffusers class nor one of "
                         f"{', '.join(_TEXT_CONFIGS)}")
    if cls_name.endswith("Scheduler"):
        return cls.from_config(cfg)
    return cls(**cfg)


def build_tiny_pipeline(family_or_path: str | dict[str, Any], init_seed: int = 0):
    """The family's stock pipeline class around tiny random components (seeded, CPU, float32);
    ``family_or_path``: a family, a YAML path, or the architecture itself."""
    import diffusers

    arch = family_or_path if isinstance(family_or_path, dict) else tiny_architecture(family_or_path)
    family = get_family(arch["family"])
    components: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        for name, spec in arch["components"].items():
            components[name] = _tokenizer(spec) if name.startswith("tokenizer") else _component(name, spec)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()                              # as from_pretrained leaves them (dropout off)
    for name, enc in components.items():
        if name.startswith("text_encoder") and hasattr(enc.config, "vocab_size"):
            tok = components.get("tokenizer" + name[len("text_encoder"):])
            if tok is not None and len(tok) > enc.config.vocab_size:
                raise ValueError(f"{arch['name']}: {name}'s vocab_size {enc.config.vocab_size} is smaller than its "
                                 f"tokenizer ({len(tok)} tokens)")
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if family.pipeline == "StableDiffusionPipeline" else {}
    extra.update({k: v for k, v in family.load_kwargs.items() if k not in extra and k not in components})
    pipe = getattr(diffusers, family.pipeline)(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family_or_path: str, folder: str | Path, init_seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a local pipeline folder (``save_pretrained``)."""
    folder = Path(folder)
    build_tiny_pipeline(family_or_path, init_seed).save_pretrained(folder)
    return folder
