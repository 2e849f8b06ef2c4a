"""The GPU projection of ``make bench``: FLOPs counted on the meta device, arithmetic stated."""
from __future__ import annotations

import pytest

from probes.bench.run import ASSUMED, flop_counts, gpu_projection, projection_section


def test_flops_are_counted_without_weights_and_scale_with_the_model():
    tiny, sd14 = flop_counts("tiny"), flop_counts("sd14")
    assert tiny["layers"] == sd14["layers"] == 16
    assert sd14["unet_guided_call"] > 100 * tiny["unet_guided_call"] > 0
    assert sd14["act_values_per_step"] == 5 * (4096 * 320 + 1024 * 640 + 256 * 1280) + 64 * 1280


def test_projection_arithmetic_and_label():
    flops = {"unet_guided_call": 1e12, "vae_decode": 2e12, "act_values_per_step": 1e6, "gram_flops_per_step": 1e9,
             "layers": 16}
    p = gpu_projection(flops, images=10, train=6, val=1, test=3, steps=5, epochs=2)
    assert p["generation_s"] == pytest.approx(10 * (5 * 1e12 + 2e12) / (ASSUMED["fp16_tflops"] * 1e12))
    assert p["store_bytes"] == 10 * 1e6 * 5 * 2
    text = "\n".join(projection_section(flops))
    assert "a projection from FLOP counts, not a measurement" in text and "Assumed sustained rates" in text
