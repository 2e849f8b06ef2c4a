"""Capture hooks and generation: invariance, labelling, sampler and latent facts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.layers import LayerRegistry
from probes.generation.call import initial_latents
from probes.generation.capture import ActivationCapture, HookNeverFired
from probes.generation.sampling import (
    CaptureSpec,
    GenerationSpec,
    generate,
    make_scheduler,
    sampler_timesteps,
)
from probes.prompts.sets import PromptRecord

RECORDS = [PromptRecord(index=i, prompt=f"a photo of a cat number {i}", seed=100 + i, split="train")
           for i in range(3)]


def layers_of(pipe, pattern="*"):
    return LayerRegistry.from_unet(pipe.unet, (16, 16)).select(pattern)


def run(pipe, capture: bool, steps=15, cap=None, records=RECORDS, batch_size=3):
    spec = GenerationSpec(steps=steps, batch_size=batch_size)
    if capture:
        return list(generate(pipe, records, [r.index for r in records], spec, layers_of(pipe), cap or CaptureSpec(),
                             progress=False))
    latents = initial_latents([r.seed for r in records], (4, 16, 16))
    pipe.scheduler = make_scheduler(pipe, "lms")
    with torch.inference_mode():
        out = pipe(prompt=[r.prompt for r in records], negative_prompt=[""] * len(records), num_inference_steps=steps,
                   guidance_scale=7.5, height=128, width=128, latents=latents, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def test_capture_does_not_change_the_image(tiny_pipe):
    plain = run(tiny_pipe, capture=False)
    batches = run(tiny_pipe, capture=True)
    assert np.array_equal(np.concatenate([b.images for b in batches]), plain)


def test_capture_shapes_steps_and_timesteps(tiny_pipe):
    (batch,) = run(tiny_pipe, capture=True)
    assert len(batch.acts) == 16
    assert batch.acts["down0.0"].shape == (3, 15, 1, 256, 32) and batch.acts["down0.0"].dtype == torch.float16
    assert batch.acts["mid.0"].shape == (3, 15, 1, 4, 64)
    assert batch.unet_calls == 15  # K-LMS: one guided call per step for the whole batch
    np.testing.assert_allclose(batch.timesteps, np.linspace(999, 0, 15), atol=1e-3)


def test_cond_half_is_the_second_half_of_the_cfg_batch(tiny_pipe):
    (both,) = run(tiny_pipe, capture=True, cap=CaptureSpec(halves="both"))
    (cond,) = run(tiny_pipe, capture=True)
    assert both.acts["up3.0"].shape[2] == 2
    assert torch.equal(both.acts["up3.0"][:, :, 1], cond.acts["up3.0"][:, :, 0])
    assert not torch.equal(both.acts["up3.0"][:, :, 0], both.acts["up3.0"][:, :, 1])


def test_step_subset_matches_full_capture(tiny_pipe):
    (full,) = run(tiny_pipe, capture=True)
    (sub,) = run(tiny_pipe, capture=True, cap=CaptureSpec(steps=[0, 3, 14]))
    assert torch.equal(sub.acts["down1.0"], full.acts["down1.0"][:, [0, 3, 14]])


def test_batching_is_fixed_chunks(tiny_pipe):
    """Only the chunks holding wanted samples run, and a sample's result does not depend on
    which other samples of its chunk are wanted (the basis of resumable generation)."""
    spec = GenerationSpec(batch_size=2)
    lay = layers_of(tiny_pipe, "mid*")
    all_b = list(generate(tiny_pipe, RECORDS, [0, 1, 2], spec, lay, CaptureSpec(), progress=False))
    one = list(generate(tiny_pipe, RECORDS, [1], spec, lay, CaptureSpec(), progress=False))
    assert [b.indices for b in all_b] == [[0, 1], [2]] and [b.indices for b in one] == [[1]]
    assert np.array_equal(one[0].images[0], all_b[0].images[1])
    assert torch.equal(one[0].acts["mid.0"][0], all_b[0].acts["mid.0"][1])


def test_hook_that_never_fires_is_an_error(tiny_pipe):
    """A processor that applies to_out's weights functionally (like a fused kernel) bypasses the hook."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Fused(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            lin = attn.to_out[0]
            real, attn.to_out[0] = lin, torch.nn.Identity()
            try:
                out = super().__call__(attn, hidden_states, *args, **kwargs)
            finally:
                attn.to_out[0] = real
            return out  # projection skipped: numerically wrong, but it is the bypass that matters

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    attn = tiny_pipe.unet.get_submodule(name)
    old = attn.processor
    attn.set_processor(Fused())
    try:
        with pytest.raises(HookNeverFired, match="down1.0.*never fired"):
            run(tiny_pipe, capture=True)
    finally:
        attn.set_processor(old)


def test_capture_argument_errors(tiny_pipe):
    lay = layers_of(tiny_pipe, "mid*")
    with pytest.raises(ValueError, match="halves"):
        ActivationCapture(tiny_pipe.unet, lay, 15, halves="uncond")
    with pytest.raises(ValueError, match=r"\[15\] out of range"):
        ActivationCapture(tiny_pipe.unet, lay, 15, steps=[15])
    with pytest.raises(ValueError, match="scheduler"):
        GenerationSpec(scheduler="heun")


def test_klms_from_the_models_own_config(tiny_pipe):
    ts = sampler_timesteps(tiny_pipe, GenerationSpec())
    np.testing.assert_allclose(ts, np.linspace(999, 0, 15), atol=1e-3)
    sched = make_scheduler(tiny_pipe, "lms")
    assert type(sched).__name__ == "LMSDiscreteScheduler"
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_start == 0.00085
    sched.set_timesteps(15)
    assert float(sched.init_noise_sigma) == pytest.approx(float(sched.sigmas[0])) == pytest.approx(14.6146, abs=1e-3)


def test_initial_latents_follow_the_reference_recipe():
    torch.manual_seed(1234)
    ref = torch.randn(1, 4, 64, 64)
    assert torch.equal(initial_latents([1234], (4, 64, 64)), ref)


def test_sd14_random_architecture_generates_one_step():
    """The full SD v1.4 architecture with random weights runs through the same code (1 step, 64 px)."""
    from probes.diffusion.loading import DiffusionSpec, load_pipeline

    pipe = load_pipeline(DiffusionSpec(source="random", architecture="sd14"), "cpu")
    lay = LayerRegistry.from_unet(pipe.unet, (8, 8)).select(["down0.0", "mid.0"])
    spec = GenerationSpec(steps=1, height=64, width=64, batch_size=1)
    (b,) = list(generate(pipe, RECORDS[:1], [0], spec, lay, CaptureSpec(), progress=False))
    assert b.acts["down0.0"].shape == (1, 1, 1, 64, 320) and b.acts["mid.0"].shape == (1, 1, 1, 1, 1280)
