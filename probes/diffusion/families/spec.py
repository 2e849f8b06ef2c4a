"""The families of text-to-image models the probes read, and what differs between them.

Every family runs through its stock diffusers pipeline; what the probes need to know about it is
small and fixed, so it is a table (:data:`FAMILIES`) rather than code per model:

- which pipeline class loads and runs it, and which attribute holds the denoiser;
- how classifier-free guidance lays out the denoiser's batch (:data:`CFG_LAYOUTS`): SD 1.x/2.x,
  SDXL, SD3 and PixArt concatenate ``[uncond, cond]`` into one call per step (``batched``);
  FLUX.1-schnell/-dev are guidance-distilled and run **one** pass per step with no unconditional
  half (``none``; FLUX.1-dev's guidance scale is an *input* of the transformer); FLUX's optional
  "true CFG" (``true_cfg_scale > 1`` with a negative prompt) runs two separate calls per step,
  the conditional one first (``sequential``);
- how steps are reported: ``callback_on_step_end(pipe, i, t, kwargs)`` everywhere except
  PixArt-α/Σ, whose pipelines still take the older ``callback(step, t, latents)``;
- how the latent maps to tokens: U-Net self-attentions work on the latent grid (stride 1 at the
  first level), SD3 and PixArt patchify 2x2 (``patch_size: 2`` in their configs), FLUX packs 2x2
  latent pixels into one token in the pipeline (its transformer's ``patch_size`` is 1);
- how it samples: SD3 and FLUX are flow-matching models (the latent moves along a straight line
  from noise to image, ``x_t = (1 - sigma) x_0 + sigma noise``), which only their own
  (``native``) flow-matching scheduler samples; the others are DDPM-type models that any of the
  protocol's samplers can run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: how a pipeline call lays out classifier-free guidance for the denoiser (see the module docstring)
CFG_LAYOUTS = ("batched", "sequential", "none")


@dataclass(frozen=True)
class Family:
    """What the probes need to know about one family of pipelines.

    :param name: the short name configs use (``sd1``, ``sdxl``, ``flux``, ...).
    :param pipeline: the diffusers pipeline class that loads and runs it.
    :param denoiser: the pipeline attribute holding the denoiser (``unet`` or ``transformer``).
    :param architecture: ``unet`` or ``transformer`` (which layer registry applies).
    :param guidance: ``cfg`` (classifier-free guidance with a negative prompt, batched) or
        ``distilled`` (FLUX: one pass; true CFG only on request).
    :param legacy_callback: the pipeline reports steps through ``callback(step, t, latents)``.
    :param packed_latents: the pipeline packs 2x2 latent pixels into one token (FLUX).
    :param text_encoders: how many text encoders the pipeline has (for the offline builders).
    :param call_kwargs: pipeline arguments every call needs for the probes' purposes (e.g. PixArt's
        resolution binning off, so that the size asked for is the size generated).
    :param load_kwargs: ``from_pretrained`` arguments (e.g. no safety checker, no watermark).
    :param real_models: the Hub ids of this family the issue names (configs/<family>/).
    :param flow_matching: a flow-matching model: sampled by its own scheduler only.
    :param clip_tokenizers: the pipeline attributes holding CLIP tokenizers (``diffusion.tokenizer:
        reference`` applies to those; T5 tokenizers have no reference behaviour to restore).
    :param hook: what a captured layer is, in words (the store manifest's ``capture.hook``).
    :param denoiser_class: the diffusers class of the denoiser (built on the meta device from its
        config to size a store before any weight is read).
    :param default_sample_size: the latent side a pipeline generates by default when its denoiser's
        config has no ``sample_size`` (FLUX's transformer: the pipeline's 128).
    """

    name: str
    pipeline: str
    denoiser: str
    architecture: str
    guidance: str = "cfg"
    legacy_callback: bool = False
    packed_latents: bool = False
    text_encoders: int = 1
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    real_models: tuple[str, ...] = ()
    flow_matching: bool = False
    clip_tokenizers: tuple[str, ...] = ("tokenizer",)
    hook: str = "attn1.to_out.0 output (before dropout and residual)"
    denoiser_class: str = "UNet2DConditionModel"
    default_sample_size: int = 64

    def cfg_layout(self, guidance_scale: float, true_cfg_scale: float = 1.0, negative_prompt: bool = True) -> str:
        """The :data:`CFG_LAYOUTS` entry a call with these settings produces (as the pipelines decide
        it: ``guidance_scale > 1`` for the CFG families; ``true_cfg_scale > 1`` and a negative prompt
        for FLUX)."""
        if self.guidance == "distilled":
            return "sequential" if true_cfg_scale > 1 and negative_prompt else "none"
        return "batched" if guidance_scale > 1 else "none"

    @property
    def is_unet(self) -> bool:
        return self.architecture == "unet"


_SD_LOAD = {"safety_checker": None, "requires_safety_checker": False}
_BLOCK_HOOK = ("block output: the image tokens the next block reads (<name>); <name>.attn: the attention output's "
               "image tokens, before gating and residual")

#: every family, by name
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "StableDiffusionPipeline", "unet", "unet", load_kwargs=_SD_LOAD,
           real_models=("CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5")),
    Family("sd2", "StableDiffusionPipeline", "unet", "unet", load_kwargs=_SD_LOAD,
           real_models=("stabilityai/stable-diffusion-2-1",)),
    Family("sdxl", "StableDiffusionXLPipeline", "unet", "unet", text_encoders=2,
           load_kwargs={"add_watermarker": False}, real_models=("stabilityai/stable-diffusion-xl-base-1.0",),
           clip_tokenizers=("tokenizer", "tokenizer_2")),
    Family("sd3", "StableDiffusion3Pipeline", "transformer", "transformer", text_encoders=3,
           real_models=("stabilityai/stable-diffusion-3.5-medium",), flow_matching=True,
           clip_tokenizers=("tokenizer", "tokenizer_2"), hook=_BLOCK_HOOK, denoiser_class="SD3Transformer2DModel"),
    Family("pixart_alpha", "PixArtAlphaPipeline", "transformer", "transformer", legacy_callback=True,
           call_kwargs={"use_resolution_binning": False, "clean_caption": False},
           real_models=("PixArt-alpha/PixArt-XL-2-512x512",), clip_tokenizers=(), hook=_BLOCK_HOOK,
           denoiser_class="PixArtTransformer2DModel"),
    Family("pixart_sigma", "PixArtSigmaPipeline", "transformer", "transformer", legacy_callback=True,
           call_kwargs={"use_resolution_binning": False, "clean_caption": False},
           real_models=("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",), clip_tokenizers=(), hook=_BLOCK_HOOK,
           denoiser_class="PixArtTransformer2DModel"),
    Family("flux", "FluxPipeline", "transformer", "transformer", guidance="distilled", packed_latents=True,
           text_encoders=2, real_models=("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"),
           flow_matching=True, hook=_BLOCK_HOOK, denoiser_class="FluxTransformer2DModel", default_sample_size=128),
)}

#: pipeline class -> family, for pipelines whose class decides it (StableDiffusionPipeline does not)
_BY_PIPELINE = {f.pipeline: f.name for f in FAMILIES.values() if f.pipeline != "StableDiffusionPipeline"}


def get_family(name: str) -> Family:
    """The family ``name``; a misspelt one fails with the valid names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; valid families: {', '.join(FAMILIES)}") from None


def family_of_pipeline_class(class_name: str, unet_config: Any = None) -> Family:
    """The family of a pipeline class (``model_index.json``'s ``_class_name``). SD 1.x and 2.x share
    ``StableDiffusionPipeline``: 2.x's U-Net projects its attention inputs linearly
    (``use_linear_projection``) and 1.x's does not."""
    if class_name == "StableDiffusionPipeline":
        linear = bool(_get(unet_config, "use_linear_projection", False)) if unet_config is not None else False
        return FAMILIES["sd2" if linear else "sd1"]
    if class_name not in _BY_PIPELINE:
        raise ValueError(f"no model family runs pipeline {class_name!r}; supported pipelines: "
                         f"StableDiffusionPipeline, {', '.join(_BY_PIPELINE)}")
    return FAMILIES[_BY_PIPELINE[class_name]]


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline (``pipe.family``, set by the loader, else read off its class)."""
    name = getattr(pipe, "family", None)
    if isinstance(name, str) and name in FAMILIES:
        return FAMILIES[name]
    unet = getattr(pipe, "unet", None)
    return family_of_pipeline_class(type(pipe).__name__, getattr(unet, "config", None))


def family_of_model_id(model_id: str) -> Family | None:
    """The family of a Hub id this table names (``real_models``), else None."""
    return next((f for f in FAMILIES.values() if model_id in f.real_models), None)


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoiser (its U-Net or transformer)."""
    return getattr(pipe, family_of(pipe).denoiser)


def native_size(pipe: Any) -> tuple[int, int]:
    """The image size the model was trained at: the denoiser's ``sample_size`` x the VAE's scale
    factor; FLUX's transformer has no ``sample_size``: the pipeline's ``default_sample_size`` (128)."""
    family = family_of(pipe)
    side = native_side(family, dict(getattr(pipe, family.denoiser).config), int(pipe.vae_scale_factor))
    return side, side


def native_side(family: Family, denoiser_config: dict[str, Any], vae_scale_factor: int) -> int:
    """The native image side from the denoiser's config (see :func:`native_size`)."""
    sample = denoiser_config.get("sample_size") or family.default_sample_size
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    return int(sample) * int(vae_scale_factor)


def _get(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)
