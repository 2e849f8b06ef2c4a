"""The activation editor: the probe loss it minimises, what it changes and what it must leave alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.layers import LayerInfo, LayerRegistry
from probes.experiments.intervention.editor import ActivationEditor, EditSettings, optimise_activation
from probes.experiments.intervention.objective import ProbeObjective, pixel_loss
from probes.experiments.intervention.pipeline import sample_images
from probes.export.probeset import LinearProbe, ProbeInfo
from probes.generation.capture import ActivationCapture
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.prompts.sets import PromptRecord

RECORDS = [PromptRecord(index=0, prompt="a red ball on a table", seed=7, split="test")]
SPEC = GenerationSpec(steps=3, batch_size=1)
SIZE = (128, 128)                       # the tiny model's native size


def make_probe(layer: LayerInfo, step: int, kind: str = "binary", seed: int = 0) -> LinearProbe:
    """A random probe with the layer's real shapes (as an export would hold)."""
    g = torch.Generator().manual_seed(seed + 31 * step)
    out = 2 if kind == "binary" else 1
    weight = torch.randn(layer.channels, out, generator=g) / layer.channels ** 0.5
    info = ProbeInfo(key=f"t/{layer.name}/step_{step:02d}", task="foreground" if kind == "binary" else "depth",
                     kind=kind, layer=layer.name, step=step, timestep=0.0, channels=layer.channels,
                     token_grid=layer.grid, label_size=SIZE, target_norm=None if kind == "binary" else
                     {"mean": 0.0, "std": 1.0}, threshold=0.0 if kind == "binary" else None, metrics={})
    return LinearProbe(info, weight)


def block_target(batch: int = 1) -> torch.Tensor:
    """A foreground mask made of whole token blocks at every grid (so a probe can reach loss 0)."""
    t = torch.zeros(batch, *SIZE)
    t[:, 32:96, 64:128] = 1
    return t


@pytest.fixture(scope="module")
def layers(tiny_pipe) -> list[LayerInfo]:
    return list(LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)))


def test_block_exact_loss_equals_the_pixel_loss_and_its_gradient():
    layer = LayerInfo("up2.0", "m", 64, (8, 8))
    acts = torch.randn(2, 64, 64, requires_grad=True)
    for kind, target in (("binary", (torch.rand(2, *SIZE) > 0.6).float()), ("regression", torch.randn(2, *SIZE) * 3)):
        probe = make_probe(layer, 0, kind)
        exact, pixel = ProbeObjective(probe, target)(acts), pixel_loss(probe, acts, target)
        torch.testing.assert_close(exact, pixel, rtol=1e-5, atol=1e-6)
        g_exact, = torch.autograd.grad(exact.sum(), acts)
        g_pixel, = torch.autograd.grad(pixel.sum(), acts)
        torch.testing.assert_close(g_exact, g_pixel, rtol=1e-4, atol=1e-7)


def test_squared_binary_loss_is_exact_and_zero_where_the_probe_reads_plus_minus_one():
    layer = LayerInfo("up2.0", "m", 64, (8, 8))
    probe = make_probe(layer, 0)
    target = (torch.rand(2, *SIZE) > 0.6).float()
    acts = torch.randn(2, 64, 64, requires_grad=True)
    exact = ProbeObjective(probe, target, binary_loss="squared")(acts)
    pixel = pixel_loss(probe, acts, target, binary_loss="squared")
    torch.testing.assert_close(exact, pixel, rtol=1e-5, atol=1e-6)
    g_exact, = torch.autograd.grad(exact.sum(), acts)
    g_pixel, = torch.autograd.grad(pixel.sum(), acts)
    torch.testing.assert_close(g_exact, g_pixel, rtol=1e-4, atol=1e-7)
    # a token-constant mask read as exactly +-1 has loss 0 (cross-entropy would still push)
    block = (torch.rand(1, 8, 8) > 0.5).float()
    mask = block.repeat_interleave(16, 1).repeat_interleave(16, 2)
    w = probe.weight[:, 1] - probe.weight[:, 0]
    acts1 = ((2 * block.reshape(1, 64, 1) - 1) * w / (w @ w))        # z = x.w = +-1 per token
    assert float(ProbeObjective(probe, mask, binary_loss="squared")(acts1)) < 1e-10
    assert float(ProbeObjective(probe, mask)(acts1)) > 0.1
    with pytest.raises(ValueError, match="binary_loss"):
        ProbeObjective(probe, mask, binary_loss="hinge")


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_projection_is_the_smallest_edit_to_the_squared_optimum(kind):
    layer = LayerInfo("up2.0", "m", 16, (8, 8))
    probe = make_probe(layer, 0, kind)
    target = (torch.rand(2, *SIZE) > 0.6).float() if kind == "binary" else torch.randn(2, *SIZE)
    # regression: a Huber threshold above every residual makes the loss squared (the projection's optimum)
    objective = ProbeObjective(probe, target, huber_delta=1e3, binary_loss="squared")
    acts = torch.randn(2, 64, 16)
    z, before, after = optimise_activation(acts, objective, EditSettings(optimizer="projection", binary_loss="squared"))
    # gradient descent on the same loss from the same start converges to the same point
    z_gd, _, after_gd = optimise_activation(acts, objective, EditSettings(optimizer="sgd", lr=2.0, iterations=3000,
                                                                          binary_loss="squared"))
    torch.testing.assert_close(z, z_gd, rtol=1e-3, atol=1e-4)
    assert torch.all(after <= before) and torch.all(after <= after_gd + 1e-6)
    # only the probe's direction changed
    w = probe.weight[:, 1] - probe.weight[:, 0] if kind == "binary" else probe.weight[:, 0]
    delta = z - acts
    torch.testing.assert_close(delta - (delta @ w)[..., None] * w / (w @ w), torch.zeros_like(delta), atol=1e-5, rtol=0)
    zero, _, _ = optimise_activation(acts, objective, EditSettings(optimizer="projection", binary_loss="squared",
                                                                   iterations=0))
    assert torch.equal(zero, acts)
    with pytest.raises(ValueError, match="squared"):
        EditSettings(optimizer="projection")


def test_a_label_size_off_the_token_grid_falls_back_to_the_pixel_loss():
    layer = LayerInfo("up2.0", "m", 16, (8, 8))
    probe = make_probe(layer, 0)
    probe.info.label_size = (100, 100)
    target = (torch.rand(1, 100, 100) > 0.5).float()
    objective = ProbeObjective(probe, target)
    acts = torch.randn(1, 64, 16)
    assert not objective.exact
    torch.testing.assert_close(objective(acts), pixel_loss(probe, acts, target), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label size"):
        ProbeObjective(probe, torch.zeros(1, 64, 64))


def test_the_optimisation_drives_the_probe_loss_near_zero():
    layer = LayerInfo("up3.0", "m", 32, (16, 16))
    acts = torch.randn(2, 256, 32)
    fg = ProbeObjective(make_probe(layer, 0, "binary"), block_target(2))
    _, before, after = optimise_activation(acts, fg, EditSettings())            # the reference's lr and iterations
    assert (before > 0.5).all() and (after < 0.2 * before).all()
    _, _, after = optimise_activation(acts, fg, EditSettings(lr=0.05))          # these small random probes need a larger lr
    assert (after < 0.01).all()
    depth_target = torch.zeros(2, *SIZE)
    depth_target[:, :64] = 3.0                                                  # block-constant: reachable exactly
    depth = ProbeObjective(make_probe(layer, 0, "regression"), depth_target)
    _, before, after = optimise_activation(acts, depth, EditSettings(lr=0.05))
    assert (before > 1).all() and (after < 1e-3).all()


def test_the_optimisation_runs_under_inference_mode():
    layer = LayerInfo("up3.0", "m", 32, (16, 16))
    objective = ProbeObjective(make_probe(layer, 0), block_target())
    with torch.inference_mode():
        acts = torch.randn(1, 256, 32)
        z, before, after = optimise_activation(acts, objective, EditSettings(iterations=16))
    assert after.item() < before.item() and not z.requires_grad


def capture_run(pipe, layers, editor=None):
    """Image and every layer's activations (both halves, float32) at every step; the editor's hooks
    go first, so the capture sees what the editor hands on."""
    cap = ActivationCapture(pipe.unet, layers, SPEC.steps, halves="both", dtype=torch.float32)
    image = sample_images(pipe, RECORDS, SPEC, [editor, cap] if editor else [cap])
    return image, cap.collect()


@pytest.fixture(scope="module")
def plain_run(tiny_pipe, layers):
    return capture_run(tiny_pipe, layers)


def test_only_the_edited_layer_and_what_follows_it_change(tiny_pipe, layers, plain_run):
    names = [layer.name for layer in layers]
    edit_step, edit_layer = 1, "up2.1"
    probe = make_probe(layers[names.index(edit_layer)], edit_step)
    editor = ActivationEditor(tiny_pipe.unet, [probe], layers, block_target(), EditSettings(iterations=8))
    plain_img, plain = plain_run
    edit_img, edited = capture_run(tiny_pipe, layers, editor)
    assert [(r.step, r.layer) for r in editor.records] == [(edit_step, edit_layer)]
    assert editor.records[0].loss_after[0] < editor.records[0].loss_before[0]
    for name in names:                                        # [B, step, half, T, C]
        assert torch.equal(plain[name][:, :edit_step], edited[name][:, :edit_step]), name   # earlier steps
    for name in names[:names.index(edit_layer)]:                                          # earlier layers
        assert torch.equal(plain[name][:, edit_step], edited[name][:, edit_step]), name
    assert torch.equal(plain[edit_layer][:, edit_step, 0], edited[edit_layer][:, edit_step, 0])  # uncond half
    assert not torch.equal(plain[edit_layer][:, edit_step, 1], edited[edit_layer][:, edit_step, 1])
    assert not np.array_equal(plain_img, edit_img)
    assert not editor._handles                                # the hooks are gone after the call


def test_zero_iterations_reproduce_the_original_exactly(tiny_pipe, layers, plain_run):
    up = [layer for layer in layers if layer.name.startswith("up")]
    probes = [make_probe(layer, s) for s in range(SPEC.steps) for layer in up]
    editor = ActivationEditor(tiny_pipe.unet, probes, layers, block_target(), EditSettings(iterations=0))
    plain_img, plain = plain_run
    edit_img, edited = capture_run(tiny_pipe, layers, editor)
    assert len(editor.records) == SPEC.steps * len(up)                 # every planned edit ran (and wrote back)
    assert np.array_equal(plain_img, edit_img)
    assert all(torch.equal(plain[n], edited[n]) for n in plain)


def test_sampling_matches_generate(tiny_pipe, plain_run):
    (batch,) = generate(tiny_pipe, RECORDS, [0], SPEC, [], CaptureSpec(), progress=False)
    assert np.array_equal(plain_run[0], batch.images)          # the editor's sampler = the store's generation


def test_editor_errors_name_the_problem(tiny_pipe, layers):
    probe = make_probe(layers[-1], 0)
    with pytest.raises(KeyError, match="does not have"):
        ActivationEditor(tiny_pipe.unet, [probe], layers[:3], block_target())
    with pytest.raises(ValueError, match="one edit per"):
        ActivationEditor(tiny_pipe.unet, [probe, probe], layers, block_target())
    editor = ActivationEditor(tiny_pipe.unet, [probe], layers, block_target(batch=2), EditSettings(iterations=1))
    with pytest.raises(ValueError, match="one target per image"):
        sample_images(tiny_pipe, RECORDS, SPEC, [editor])
    with pytest.raises(ValueError, match="iterations"):
        EditSettings(iterations=-1)
