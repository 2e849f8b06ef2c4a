"""The toy world's exact-label protocol: renders noised to every step, one denoiser call per step.

Why: probes of the sampling protocol are scored against pseudo-labels of *generated* images, so a
weak score mixes what the model does not know with what the labeler gets wrong. Here each record's
scene (its ``source_id``: :func:`probes.toy.prompts.scene_id`) is rendered, so the renderer's exact
labels belong to the very image whose latent the U-Net sees:

1. the render is encoded by the model's VAE (posterior mean x ``scaling_factor``, as its training
   latents were);
2. the record's seed draws the noise the sampler would start from
   (:func:`probes.generation.call.initial_latents`);
3. for every captured step the latent is noised to that step's timestep by the sampler's own
   ``add_noise`` (K-LMS: ``x0 + sigma_t noise``) and scaled by its ``scale_model_input``, which is
   what the sampler feeds the U-Net at that step (a sampled trajectory is at that noise level there,
   but drifts from the render);
4. the U-Net runs once, on the caption's embedding, with the capture hooks on.

With ``generation.decode: noisy`` the test images' intermediate images are decoded as in the
sampling protocol, from the latent the sampler would hand to the next step if it stayed on the
render's path: the render's latent noised to the next step's level, and at the last step the clean
latent (the VAE's reconstruction of the render). A labeler on these, scored against the renderer's
exact labels, is the decoded-image baseline that does not end at 1 by construction.

The conditional pass alone (capture layout ``none``): without a trajectory, guidance steers nothing,
and a U-Net's conditional half does not depend on the unconditional one beside it in a batch (every
operation is per sample), so a batched ``[uncond, cond]`` call would only double the cost. The store
these batches fill is an ordinary one whose image is the render, so labels, probes, metrics and
reports read it unchanged.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch

from probes.diffusion.families.spec import family_of
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import precision_of
from probes.generation.call import initial_latents
from probes.generation.capture import ActivationCapture
from probes.generation.sampling import (
    CaptureSpec,
    GeneratedBatch,
    GenerationSpec,
    StepProgress,
    batches,
    decode_latents,
    denoising,
    image_size,
    make_scheduler,
)
from probes.prompts.sets import PromptRecord
from probes.toy.prompts import scene_of
from probes.toy.world import render


def check_capture(layers: Sequence[LayerInfo], capture: CaptureSpec) -> None:
    """Refuse, before any compute, what the exact-label protocol cannot capture."""
    if capture.halves != "cond":
        raise ValueError("generation.start=renders runs the conditional pass only (no trajectory for guidance to "
                         "steer): set capture.halves=cond")
    vae = [layer.name for layer in layers if layer.in_vae]
    if vae:
        raise ValueError(f"capture layers {vae} read the VAE decoder on the sampler's next latent, which "
                         f"generation.start=renders never makes: drop them from capture.layers")


def renders_of(records: Sequence[PromptRecord], size: int) -> np.ndarray:
    """``[N, size, size, 3]`` uint8: each record's scene, rendered."""
    return np.stack([render(scene_of(r.source_id), size).rgb for r in records])


def encode(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 renders -> the VAE posterior mean x ``scaling_factor``, in the pipeline's latent dtype."""
    pixels = pipe.image_processor.preprocess(images.astype(np.float32) / 255.0)
    pixels = pixels.to(pipe.device, pipe.vae.dtype)
    mean = pipe.vae.encode(pixels).latent_dist.mean
    return (mean * pipe.vae.config.scaling_factor).to(precision_of(pipe).latents)


def denoiser_input(scheduler, steps: int, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """The latent the sampler (of ``steps`` steps) feeds its denoiser at ``step``, for a clean latent ``x0`` and ``noise``:
    the scheduler's ``add_noise`` to that step's timestep, then its ``scale_model_input``.

    ``set_timesteps`` first, every time: K-LMS's ``scale_model_input`` reads the step index it set on
    its first call, which would otherwise stay at the first step's sigma."""
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[step]
    noisy = scheduler.add_noise(x0, noise, t.reshape(1).expand(len(x0)))
    return scheduler.scale_model_input(noisy, t)


def next_latent(scheduler, steps: int, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """The latent a sampler that stayed on ``x0``'s path hands on after ``step`` (``decode: noisy``):
    ``x0`` noised to the next step's timestep, and ``x0`` itself after the last step."""
    scheduler.set_timesteps(steps)
    if step + 1 >= len(scheduler.timesteps):
        return x0
    t = scheduler.timesteps[step + 1]
    return scheduler.add_noise(x0, noise, t.reshape(1).expand(len(x0)))


def noised_renders(pipe, records: Sequence[PromptRecord], todo: Sequence[int], spec: GenerationSpec,
                   layers: Sequence[LayerInfo], capture: CaptureSpec, acts_device: str | None = "cpu",
                   progress: bool = True, desc: str = "noising renders",
                   universe: Sequence[int] | None = None, decode: Collection[int] | None = None
                   ) -> Iterator[GeneratedBatch]:
    """:func:`probes.generation.sampling.generate`'s batches for ``generation.start=renders``: same
    chunks, same fields; the image is the render, and with ``decode: noisy`` the samples of ``decode``
    (default: every wanted one) get :func:`next_latent` decoded at every captured step."""
    family = family_of(pipe)
    spec.check_family(family)
    check_capture(layers, capture)
    height, width = image_size(pipe, spec)
    if height != width:
        raise ValueError(f"the toy renderer draws square images; generation height/width are {height}x{width}")
    todo_set = set(int(i) for i in todo)
    decode_set = todo_set if decode is None else {int(i) for i in decode}
    order = [r.index for r in records] if universe is None else list(universe)
    chunks = [c for c in batches(order, spec.batch_size) if todo_set.intersection(c)]
    by_index = {r.index: r for r in records}
    pipe.scheduler = make_scheduler(pipe, spec.scheduler)
    pipe.scheduler.set_timesteps(spec.steps)
    timesteps = pipe.scheduler.timesteps
    denoiser = getattr(pipe, family.denoiser)
    bar = StepProgress(len(chunks), spec.steps, len(todo_set), desc, progress)
    cap = ActivationCapture(denoiser, layers, spec.steps, capture.steps, capture.halves,
                            getattr(torch, capture.dtype), cfg="none")
    kept = set(cap.steps)
    done = 0
    with cap:
        for chunk in chunks:
            recs = [by_index[i] for i in chunk]
            cap.reset()
            calls0 = cap.unet_calls
            images = renders_of(recs, height)
            keep = [k for k, i in enumerate(chunk) if i in todo_set]
            rows = [k for k in keep if chunk[k] in decode_set] if spec.decode != "none" else []
            decoded = None if spec.decode == "none" else np.zeros((0, len(cap.steps), height, width, 3), np.uint8)
            with denoising(pipe):
                x0 = encode(pipe, images)
                noise = initial_latents([r.seed for r in recs], tuple(x0.shape[1:])).to(x0.device, x0.dtype)
                embeds, _ = pipe.encode_prompt([r.prompt for r in recs], pipe.device, 1, False)
                for i, t in enumerate(timesteps):
                    if i in kept:
                        sample = denoiser_input(pipe.scheduler, spec.steps, x0, noise, i)
                        denoiser(sample, t, encoder_hidden_states=embeds, return_dict=False)
                    cap.on_step_end(pipe, i, t, {})
                    bar.step(done + (cap.unet_calls - calls0) * len(chunk))
                if rows:
                    lat = torch.stack([next_latent(pipe.scheduler, spec.steps, x0[rows], noise[rows], s)
                                       for s in cap.steps], 1)                          # [R, S_sel, C, h, w]
                    decoded = decode_latents(pipe, lat.flatten(0, 1), height, width).reshape(
                        len(rows), len(cap.steps), height, width, 3)
            acts = cap.collect(acts_device)
            sel = torch.tensor(keep)
            calls = cap.unet_calls - calls0
            done += calls * len(chunk)
            bar.batch_done(len(keep))
            yield GeneratedBatch(indices=[chunk[k] for k in keep], images=images[keep],
                                 acts={n: a[sel.to(a.device)] for n, a in acts.items()},
                                 timesteps=[float(t) for t in cap.timesteps], sigmas=list(cap.sigmas),
                                 decoded_images=decoded, unet_calls=calls, guided_calls=calls * len(chunk),
                                 decoded_indices=[chunk[k] for k in rows])
    bar.close()
