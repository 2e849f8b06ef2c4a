"""The store's manifest: what its content depends on, and the fingerprint that names its folder.

Two runs with the same model, sampler (and generation batch size), capture settings and prompts
share a store; anything that changes the activations changes the fingerprint, so a store is
never silently reused for other settings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from probes.common.hashing import sha256_json, sha256_text
from probes.common.version import code_version
from probes.diffusion.families.layers import pipeline_registry
from probes.diffusion.families.spec import Family, family_of
from probes.diffusion.layers import LayerInfo, LayerRegistry
from probes.diffusion.loading import DiffusionSpec, resolved_revision
from probes.generation.renders import check_capture
from probes.generation.sampling import CaptureSpec, GenerationSpec, image_size, sampler_schedule
from probes.prompts.sets import PromptRecord, prompts_fingerprint


def store_request(diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                  records: Sequence[PromptRecord], store_activations: bool = True) -> dict[str, Any]:
    """What a store's content depends on; its hash names the default store folder.

    ``generation.batch_size`` is part of it: batched convolutions and attention sum in another
    order for another batch composition, which moves activations by ~1e-4 (metrics by ~4e-4).
    Resuming a store with another batch size would mix two compositions in one store and
    reusing a complete one would give numbers a clean run does not; with the batch size in the
    fingerprint another batch size gets its own store (an explicit ``data.store_dir`` made with
    another batch size is refused, naming both values).

    ``generation.decode`` is part of it too (the decoded images are stored, and a store decoded
    from x0 must never be read as the noisy-latent baseline). It is written as the key stores had
    before ``decode`` existed (``decode_x0: false/true`` for ``none``/``x0``), plus ``decode:
    noisy`` for the new value, so that existing stores (hours of SD v1.4 generation) keep their
    fingerprints and folders; so are the options added with the model families (``true_cfg_scale``,
    ``max_sequence_length``, ``diffusion.family``), left out at their SD v1.x values.

    A store of ``generation.start=renders`` depends on the scenes rendered too: their names (the
    records' ``source_id``), which the prompt fingerprint does not read, are hashed in as ``scenes``.
    """
    gen = generation.fingerprint_fields()
    decode = gen.pop("decode")
    gen["decode_x0"] = decode == "x0"
    if decode == "noisy":
        gen["decode"] = decode
    cap = asdict(capture)
    if not cap["record_inputs"]:      # stores made before record_inputs existed keep their fingerprints
        cap.pop("record_inputs")
    req = {"model": diffusion.identity(), "generation": gen, "capture": cap,
           "prompts": prompts_fingerprint(records), "num_samples": len(records)}
    if generation.start == "renders":
        req["scenes"] = sha256_text("".join(f"{r.index}\t{r.source_id}\n" for r in records), 16)
    if not store_activations:
        req["images_only"] = True
    return req


def request_fingerprint(request: dict[str, Any]) -> str:
    """The store request's fingerprint: 12 hex digits of its canonical JSON (names the store folder)."""
    return sha256_json(request, 12)


def resolve_capture(registry: LayerRegistry, capture: CaptureSpec,
                    generation: GenerationSpec) -> tuple[list[LayerInfo], list[int]]:
    """The one place ``capture.layers`` patterns and ``capture.steps`` are resolved: the layers they
    select (forward order) and the steps kept. The result is written into the manifest, and every
    later stage reads it from there (``ActivationStore.layers``), never from the patterns again."""
    layers = registry.select(capture.layers)
    steps = list(range(generation.steps)) if capture.steps is None else sorted(set(capture.steps))
    bad = [s for s in steps if not 0 <= s < generation.steps]
    if bad:
        raise ValueError(f"capture.steps {bad} out of range: generation.steps={generation.steps} gives steps 0..{generation.steps - 1}")
    return layers, steps


def capture_section(layers: Sequence[LayerInfo], steps: Sequence[int], capture: CaptureSpec, store_activations: bool,
                    timesteps: Sequence[float] | None = None, family: Family | None = None, cfg: str | None = None,
                    sigmas: Sequence[float | None] | None = None, inputs: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The manifest's ``capture`` section (without timesteps: the part a disk estimate needs).

    "step" is the index of the denoising step, "timestep" what the scheduler reports for it
    (``timesteps``: the captured steps'; ``all_timesteps``: every step's) and ``sigmas`` its noise
    level where it has one (flow matching: ``timestep / 1000``). ``cfg`` is how guidance laid out
    the denoiser's batch (:data:`probes.diffusion.families.spec.CFG_LAYOUTS`), ``hook`` what a
    layer's output is; ``inputs`` (:func:`inputs_section`) with ``capture.record_inputs``.
    """
    section: dict[str, Any] = {"layers": [layer.to_dict() for layer in layers], "steps": list(steps)}
    if timesteps is not None:
        section.update(timesteps=[timesteps[s] for s in steps], all_timesteps=list(timesteps))
    if sigmas is not None:
        section.update(sigmas=[sigmas[s] for s in steps], all_sigmas=list(sigmas))
    hook = family.hook if family is not None else "attn1.to_out.0 output (before dropout and residual)"
    section.update(halves=["cond"] if capture.halves == "cond" else ["uncond", "cond"], dtype=capture.dtype,
                   hook=hook, store_activations=store_activations)
    if cfg is not None:
        section["cfg"] = cfg
    if capture.record_inputs:
        if inputs is None:
            raise ValueError("capture.record_inputs needs the shapes of the denoiser's inputs (inputs_section)")
        section["inputs"] = inputs
    return section


def inputs_section(in_channels: int, latent_hw: tuple[int, int], guidance: bool, text_len: int, text_dim: int,
                   dtypes: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``capture.record_inputs`` stores per sample: the latent model input at every captured step
    ``[S, C, h, w]`` and the text embeddings ``[halves, L, D]`` (uncond, cond), kept as float32 (exact for
    fp16 and fp32 values) with the dtypes the U-Net received them in, so a replay casts them back exactly."""
    return {"latent_shape": [int(in_channels), int(latent_hw[0]), int(latent_hw[1])],
            "text_shape": [2 if guidance else 1, int(text_len), int(text_dim)], "stored_as": "float32",
            "dtypes": dict(dtypes or {})}


def family_registry(pipe, height: int, width: int) -> LayerRegistry:
    """The layers of a loaded pipeline of any family at an image size, ``vae.mid`` included for the
    U-Net families (:func:`probes.diffusion.families.layers.pipeline_registry`)."""
    return pipeline_registry(pipe, height, width)


def check_image_size(height: int, width: int, multiple: int) -> None:
    """Token grids must divide the labels evenly: the image side is a multiple of the VAE factor x the
    grid's coarsest stride (U-Nets: 8 x the VAE's 8 x; transformers: the token stride, 2 x)."""
    if height % multiple or width % multiple:
        raise ValueError(f"generation height/width must be multiples of {multiple} (token grids must divide the "
                         f"labels evenly); got {height}x{width}")


def size_multiple(family: Family, vae_scale_factor: int) -> int:
    """What :func:`check_image_size` requires of a family: 8 latent pixels (a U-Net's three halvings)
    or 2 (a transformer's 2x2 patches or packing), times the VAE's scale factor."""
    return (8 if family.is_unet else 2) * int(vae_scale_factor)


def latent_init(generation: GenerationSpec, family: Family) -> str:
    """What the manifest says a sample's first latent is."""
    noise = ("torch.manual_seed(seed); torch.randn(1, C, H/8, W/8) on CPU, unscaled"
             + (" (packed 2x2 as the pipeline packs)" if family.packed_latents else ""))
    if generation.start == "renders":
        return (f"the record's scene rendered, VAE posterior mean x scaling_factor, noised to each captured step's "
                f"timestep by the scheduler's add_noise with noise {noise}, then scale_model_input; conditional pass "
                f"only")
    return noise


def build_manifest(pipe, diffusion: DiffusionSpec, generation: GenerationSpec, capture: CaptureSpec,
                   records: Sequence[PromptRecord], store_activations: bool = True) -> dict[str, Any]:
    from probes.diffusion.families.spec import denoiser_of

    family = family_of(pipe)
    height, width = image_size(pipe, generation)
    check_image_size(height, width, size_multiple(family, pipe.vae_scale_factor))
    registry = family_registry(pipe, height, width)
    layers, steps = resolve_capture(registry, capture, generation)
    if generation.start == "renders":
        generation.check_family(family)
        check_capture(layers, capture)
    timesteps, sigmas = sampler_schedule(pipe, generation)
    request = store_request(diffusion, generation, capture, records, store_activations)
    model = dict(diffusion.identity(), resolved_revision=resolved_revision(pipe), is_random=diffusion.is_random,
                 dtype=str(denoiser_of(pipe).dtype).replace("torch.", ""))
    inputs = None
    if capture.record_inputs:
        if not family.is_unet:
            raise ValueError(f"data.capture.record_inputs covers U-Net families (text-conditioned U-Nets); "
                             f"{family.name} is not one: set record_inputs: false")
        f = pipe.vae_scale_factor
        inputs = inputs_section(pipe.unet.config.in_channels, (height // f, width // f), generation.guidance_scale > 1,
                                pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    return {
        "fingerprint": request_fingerprint(request),
        "request": request,
        "code_version": code_version(),
        "model": model,
        "generation": dict(asdict(generation), height=height, width=width, latent_init=latent_init(generation, family)),
        "capture": capture_section(layers, steps, capture, store_activations, timesteps, family,
                                   generation.cfg_layout(family), sigmas, inputs),
        "num_samples": len(records),
        "prompts": [asdict(r) for r in records],
    }
