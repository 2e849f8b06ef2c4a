"""Latent guidance on the tiny random model: weight 0 is the original image; a weight lowers the probe loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.layers import LayerInfo, LayerRegistry
from probes.experiments.intervention.guidance import GuidanceSettings, LatentGuidance
from probes.experiments.intervention.objective import ProbeObjective
from probes.experiments.intervention.pipeline import sample_images
from probes.generation.capture import ActivationCapture
from tests.integration.test_intervention_editor import RECORDS, SPEC, block_target, make_probe

GUIDED = ("up2.1", "up3.0")


@pytest.fixture(scope="module")
def layers(tiny_pipe) -> list[LayerInfo]:
    return list(LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)))


@pytest.fixture(scope="module")
def plain_image(tiny_pipe) -> np.ndarray:
    return sample_images(tiny_pipe, RECORDS, SPEC)


def plan(layers: list[LayerInfo], steps: tuple[int, ...]) -> list:
    return [make_probe(layer, s) for s in steps for layer in layers if layer.name in GUIDED]


def test_weight_zero_reproduces_the_original_image_bit_for_bit(tiny_pipe, layers, plain_image):
    guide = LatentGuidance(tiny_pipe, plan(layers, (0, 1)), layers, block_target(), GuidanceSettings(weight=0.0))
    image = sample_images(tiny_pipe, RECORDS, SPEC, [guide])
    assert np.array_equal(plain_image, image)
    assert [(r.step, r.layer) for r in guide.records] == [(0, ",".join(GUIDED)), (1, ",".join(GUIDED))]
    for r in guide.records:           # the pipeline's own call reads what the guidance's call read
        np.testing.assert_allclose(r.loss_after, r.loss_before, rtol=1e-5)
    sched = tiny_pipe.scheduler       # the scheduler is left as found
    assert "step" not in sched.__dict__ and "scale_model_input" not in sched.__dict__
    assert not guide._handles


def test_guidance_lowers_the_probe_loss_on_the_steps_activations(tiny_pipe, layers, plain_image):
    probes = plan(layers, (1,))
    guide = LatentGuidance(tiny_pipe, probes, layers, block_target(), GuidanceSettings(weight=0.05))
    read = [layer for layer in layers if layer.name in GUIDED]
    plain_cap = ActivationCapture(tiny_pipe.unet, read, SPEC.steps, dtype=torch.float32)
    sample_images(tiny_pipe, RECORDS, SPEC, [plain_cap])
    cap = ActivationCapture(tiny_pipe.unet, read, SPEC.steps, dtype=torch.float32)
    image = sample_images(tiny_pipe, RECORDS, SPEC, [guide, cap])
    (record,) = guide.records
    assert record.step == 1 and record.loss_after[0] < record.loss_before[0]
    assert not np.array_equal(plain_image, image)
    plain, guided = plain_cap.collect(), cap.collect()             # [B, step, half, T, C]
    for name in GUIDED:
        assert torch.equal(plain[name][:, 0], guided[name][:, 0])   # the step before the guided one: untouched
    # the capture holds the pipeline's call of the guided step: the probe loss on it is the record's "after"
    losses = [ProbeObjective(p, block_target())(guided[p.info.layer][:, 1, 0]) for p in probes]
    np.testing.assert_allclose(torch.stack(losses).mean(0).numpy(), record.loss_after, rtol=1e-5)
    plain_losses = [ProbeObjective(p, block_target())(plain[p.info.layer][:, 1, 0]) for p in probes]
    np.testing.assert_allclose(torch.stack(plain_losses).mean(0).numpy(), record.loss_before, rtol=1e-5)


def test_guidance_settings_and_plans_are_checked(tiny_pipe, layers):
    with pytest.raises(ValueError, match="weight"):
        GuidanceSettings(weight=-1)
    with pytest.raises(ValueError, match="iterations"):
        GuidanceSettings(iterations=0)
    with pytest.raises(KeyError, match="does not have"):
        LatentGuidance(tiny_pipe, plan(layers, (0,)), layers[:2], block_target())
    probe = make_probe(layers[-1], 0)
    with pytest.raises(ValueError, match="one per"):
        LatentGuidance(tiny_pipe, [probe, probe], layers, block_target())
    guide = LatentGuidance(tiny_pipe, [probe], layers, block_target(batch=2))
    with pytest.raises(ValueError, match="one target per image"):
        sample_images(tiny_pipe, RECORDS, SPEC, [guide])
    assert "step" not in tiny_pipe.scheduler.__dict__             # restored after the error too
