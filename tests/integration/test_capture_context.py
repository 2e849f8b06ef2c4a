"""``with capture(pipe, ...) as acts: pipe(...)``: the store's capture, from a call the user makes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.families.layers import pipeline_registry
from probes.generation.call import initial_latents
from probes.generation.capture_context import capture
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate, make_scheduler
from probes.prompts.sets import PromptRecord

RECORDS = [PromptRecord(index=i, prompt=f"a photo of a cat number {i}", seed=100 + i, split="train") for i in range(2)]


def user_call(pipe, steps=5, guidance_scale=7.5, records=RECORDS):
    """A call as a user writes it (the store's prompts, seeds and sampler, so the two can be compared)."""
    pipe.scheduler = make_scheduler(pipe, "lms")
    latents = initial_latents([r.seed for r in records], (4, 16, 16))
    return pipe(prompt=[r.prompt for r in records], negative_prompt=[""] * len(records), num_inference_steps=steps,
                guidance_scale=guidance_scale, height=128, width=128, latents=latents, output_type="np").images


def test_capture_equals_the_store_capture(tiny_pipe):
    layers = pipeline_registry(tiny_pipe, 128, 128).select(["up*", "vae.mid"])
    spec = GenerationSpec(steps=5, batch_size=2, height=128, width=128)
    (batch,) = generate(tiny_pipe, RECORDS, [0, 1], spec, layers, CaptureSpec(steps=[0, 3], dtype="float32"),
                        progress=False)
    plain = user_call(tiny_pipe)
    sched = tiny_pipe.scheduler
    with capture(tiny_pipe, layers=["up*", "vae.mid"], steps=[0, 3]) as acts:
        images = user_call_keeping_scheduler(tiny_pipe)
    assert tiny_pipe.scheduler is sched                       # the block leaves the pipeline as it found it
    assert np.array_equal(images, plain)                      # hooks only read
    assert acts.layers == [layer.name for layer in layers] and acts.steps == [0, 3]
    assert len(acts) == 2 * len(layers)
    for (step, name), got in acts.items():
        want = batch.acts[name][:, [0, 3].index(step), 0]
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert acts.timesteps[0] == pytest.approx(batch.timesteps[0])


def user_call_keeping_scheduler(pipe, steps=5, guidance_scale=7.5, records=RECORDS):
    latents = initial_latents([r.seed for r in records], (4, 16, 16))
    return pipe(prompt=[r.prompt for r in records], negative_prompt=[""] * len(records), num_inference_steps=steps,
                guidance_scale=guidance_scale, height=128, width=128, latents=latents, output_type="np").images


def test_capture_equals_a_direct_hook(tiny_pipe):
    """The conditional half of what the module itself returned at step 3 (K-LMS: one denoiser call per step)."""
    tiny_pipe.scheduler = make_scheduler(tiny_pipe, "lms")
    module = tiny_pipe.unet.get_submodule(pipeline_registry(tiny_pipe, 128, 128).get("up3.0").module)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with capture(tiny_pipe, layers="up3.0", steps=[3]) as acts:
            user_call_keeping_scheduler(tiny_pipe)
    finally:
        handle.remove()
    assert len(seen) == 5
    torch.testing.assert_close(acts[(3, "up3.0")], seen[3][2:], rtol=0, atol=0)


def test_both_halves_calls_and_guidance_off(tiny_pipe):
    tiny_pipe.scheduler = make_scheduler(tiny_pipe, "lms")
    with capture(tiny_pipe, layers="mid*", steps=[1], halves="both") as both:
        user_call_keeping_scheduler(tiny_pipe)
        user_call_keeping_scheduler(tiny_pipe, records=RECORDS[:1])
    assert both.calls == 2 and both[(1, "mid.0")].shape == (3, 2, 4, 64)
    torch.testing.assert_close(both[(1, "mid.0")][2], both[(1, "mid.0")][0], rtol=1e-4, atol=1e-5)  # batch of 1 vs 2
    with capture(tiny_pipe, layers="mid*") as off:               # guidance_scale 1: one pass, no halves
        user_call_keeping_scheduler(tiny_pipe, guidance_scale=1.0)
    assert off.steps == list(range(5)) and off[(4, "mid.0")].shape == (2, 4, 64)


def test_capture_errors_name_the_fix(tiny_pipe):
    with pytest.raises(KeyError, match="valid layers: down0.0"):
        capture(tiny_pipe, layers="upp*")
    with pytest.raises(ValueError, match=r"capture steps \[9\] out of range 0..4"):
        with capture(tiny_pipe, layers="mid*", steps=[9]):
            user_call_keeping_scheduler(tiny_pipe)
    with capture(tiny_pipe, layers="mid*", steps=[0]) as acts:
        pass
    with pytest.raises(KeyError, match="no pipeline call has finished"):
        acts[(0, "mid.0")]
