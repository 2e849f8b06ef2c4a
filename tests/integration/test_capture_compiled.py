"""Capture with the denoiser under ``torch.compile``: hooks first, then compile (``capture(..., compile=...)``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.generation.call import initial_latents
from probes.generation.capture_context import capture
from probes.generation.sampling import make_scheduler

LAYERS = ["mid*", "up3.0"]


def call(pipe, steps=2):
    latents = initial_latents([1, 2], (4, 16, 16))
    return pipe(["a cat", "a dog"], negative_prompt=["", ""], num_inference_steps=steps, height=128, width=128,
                latents=latents, output_type="np").images


def test_compile_swaps_the_denoiser_for_the_block_and_refuses_a_compiled_one(tiny_pipe):
    unet = tiny_pipe.unet
    with capture(tiny_pipe, layers=LAYERS, compile="eager"):
        assert hasattr(tiny_pipe.unet, "_orig_mod") and tiny_pipe.unet._orig_mod is unet
    assert tiny_pipe.unet is unet
    tiny_pipe.unet = torch.compile(unet)
    try:
        with pytest.raises(ValueError, match=r"already compiled.*compile=True"):
            capture(tiny_pipe, layers=LAYERS)
    finally:
        tiny_pipe.unet = unet


@pytest.mark.slow        # compiling the tiny U-Net takes minutes on two shared cores
def test_compiled_capture_equals_eager_capture(tiny_pipe):
    import torch._dynamo

    tiny_pipe.scheduler = make_scheduler(tiny_pipe, "lms")
    with capture(tiny_pipe, layers=LAYERS) as eager:
        plain = call(tiny_pipe)
    try:
        backend = "inductor"
        with capture(tiny_pipe, layers=LAYERS, compile=backend) as compiled:
            images = call(tiny_pipe)
    except torch._dynamo.exc.BackendCompilerFailed:   # no C++ toolchain for inductor on this machine
        torch._dynamo.reset()
        backend = "aot_eager"
        with capture(tiny_pipe, layers=LAYERS, compile=backend) as compiled:
            images = call(tiny_pipe)
    print(f"compiled with backend {backend}")
    assert not hasattr(tiny_pipe.unet, "_orig_mod")
    assert list(compiled) == list(eager) and len(eager) == 2 * 2
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)
    assert np.abs(images - plain).max() < 1e-4
