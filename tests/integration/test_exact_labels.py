"""The toy world's exact-label protocol (``generation.start=renders``) on the shipped toy model.

What it must keep: the store's activation at (step, layer) is the U-Net's output for the render's
latent noised to that step (computed here by hand from the scheduler's sigmas, not through the
code under test), its image is the render, and the ``toy_exact`` labels are the renderer's maps.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from probes.diffusion.loading import DiffusionSpec, local_model_dir

pytestmark = pytest.mark.skipif(local_model_dir("data/toy/model") is None,
                                reason="data/toy/model absent (make toy-model)")

TOY = DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True)
N, STEPS, KEPT = 3, 15, [0, 7, 14]


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory):
    from probes.diffusion.loading import load_pipeline
    from probes.generation.sampling import CaptureSpec, GenerationSpec
    from probes.prompts.sets import PromptSpec, load_prompts
    from probes.store.fill import ensure_store

    records = load_prompts(PromptSpec(source="toy", test_fraction=0.0, val_fraction=0.0))[:N]
    generation = GenerationSpec(steps=STEPS, guidance_scale=7.5, scheduler="lms", batch_size=N, start="renders")
    capture = CaptureSpec(layers=["down0.0", "mid.0", "up3.2"], steps=KEPT, dtype="float32")
    store = ensure_store(tmp_path_factory.mktemp("exact") / "store", records, TOY, generation, capture, "cpu",
                         progress=False)
    return store, records, load_pipeline(TOY, "cpu")


def _scenes(records):
    from probes.toy.world import render, scene_for

    ids = [r.source_id.split(":") for r in records]
    return [render(scene_for(int(seed), int(i), world=world), 64) for world, seed, i in ids]


def test_the_store_image_is_the_render_of_the_records_scene(exact_store):
    store, records, _ = exact_store
    renders = _scenes(records)
    assert [r.source_id for r in records] == ["v2:777:0", "v2:777:1", "v2:777:2"]   # the CSV's id column
    for k, r in enumerate(renders):
        assert r.caption == records[k].prompt
        assert np.array_equal(store.image(k), r.rgb)
    assert store.manifest["capture"]["cfg"] == "none" and store.manifest["capture"]["halves"] == ["cond"]


@pytest.mark.parametrize("slot", range(len(KEPT)))
def test_captured_activations_equal_a_direct_unet_call_on_the_same_noised_latent(exact_store, slot):
    """Issue 20's test: by hand, x_t = x0 + sigma_t noise (K-LMS), fed as x_t / sqrt(sigma_t^2 + 1) with the
    step's timestep and the caption's CLIP embedding; a forward hook reads each layer's output."""
    store, records, pipe = exact_store
    from probes.generation.sampling import make_scheduler

    step = KEPT[slot]
    sched = make_scheduler(pipe, "lms")
    sched.set_timesteps(STEPS)
    sigma, t = float(sched.sigmas[step]), sched.timesteps[step]
    assert store.manifest["capture"]["timesteps"][slot] == pytest.approx(float(t))
    rgb = np.stack([r.rgb for r in _scenes(records)])
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    noise = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(r.seed)) for r in records])
    ids = pipe.tokenizer([r.prompt for r in records], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    got: dict[str, torch.Tensor] = {}
    modules = {layer.name: layer.module for layer in store.layers}
    handles = [pipe.unet.get_submodule(m).register_forward_hook(lambda mod, a, out, n=n: got.__setitem__(n, out))
               for n, m in modules.items()]
    try:
        with torch.no_grad():
            x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            x = (x0 + sigma * noise) / (sigma ** 2 + 1) ** 0.5
            pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0])
    finally:
        for h in handles:
            h.remove()
    for name in modules:
        stored = torch.from_numpy(np.stack([store.activation(name, k)[slot, 0] for k in range(N)]))
        torch.testing.assert_close(stored, got[name].float(), rtol=1e-5, atol=1e-5, msg=f"{name} at step {step}")


def test_exact_labels_are_the_renderers_maps(exact_store):
    from probes.labels.cache import LabelCache
    from probes.labels.toy_exact import ToyExact

    store, records, _ = exact_store
    renders = _scenes(records)
    labels = {}
    for kind in ("foreground", "depth", "shading"):
        cache = LabelCache(store, kind, ToyExact(kind=kind))
        cache.ensure(range(N), progress=False)
        labels[kind] = np.asarray(cache.array())
    for k, r in enumerate(renders):
        assert r.foreground.any() and not r.foreground.all()
        assert np.array_equal(labels["foreground"][k], r.foreground.astype(np.float32))
        assert np.array_equal(labels["shading"][k], r.shading)
        inv = r.inv_depth.astype(np.float64)
        np.testing.assert_allclose(labels["depth"][k], (inv - inv.mean()) / inv.std(), rtol=1e-5, atol=1e-5)


def test_exact_labeler_refuses_a_store_of_sampled_images_and_loose_images():
    from probes.labels.toy_exact import ToyExact

    labeler = ToyExact(kind="depth")
    sampled = SimpleNamespace(root="somewhere", manifest={"generation": {"decode": "none"}, "prompts": []})
    with pytest.raises(ValueError, match="generation.start=noise"):
        labeler.bind(sampled)
    with pytest.raises(ValueError, match="by index"):
        labeler(np.zeros((1, 64, 64, 3), np.uint8), np.array([0]))
    with pytest.raises(ValueError, match="kind='normals'"):
        ToyExact(kind="normals")


def test_decoded_renders_are_the_renders_latent_on_its_own_path_decoded(exact_store):
    """``decode: noisy`` with renders: after step s the render's latent at the next step's noise level,
    x0 + sigma_(s+1) noise (by hand from the scheduler's sigmas), decoded; after the last step x0 itself,
    i.e. the VAE's reconstruction of the render. Only the samples asked for are decoded."""
    from probes.generation.renders import noised_renders
    from probes.generation.sampling import CaptureSpec, GenerationSpec, make_scheduler

    _, records, pipe = exact_store
    generation = GenerationSpec(steps=STEPS, batch_size=N, start="renders", decode="noisy")
    capture = CaptureSpec(layers=["mid.0"], steps=KEPT, dtype="float32")
    from probes.diffusion.families.layers import pipeline_registry

    layers = pipeline_registry(pipe, 64, 64).select(["mid.0"])
    (batch,) = list(noised_renders(pipe, records, [0, 1, 2], generation, layers, capture, progress=False,
                                   decode=[0, 2]))
    assert batch.decoded_indices == [0, 2] and batch.decoded_images.shape == (2, len(KEPT), 64, 64, 3)
    sched = make_scheduler(pipe, "lms")
    sched.set_timesteps(STEPS)
    rgb = np.stack([r.rgb for r in _scenes(records)])[[0, 2]]
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    noise = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(records[k].seed))
                       for k in (0, 2)])
    with torch.no_grad():
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        for slot, step in enumerate(KEPT):
            sigma = float(sched.sigmas[step + 1]) if step + 1 < STEPS else 0.0
            img = pipe.vae.decode((x0 + sigma * noise) / pipe.vae.config.scaling_factor).sample
            want = ((img.clamp(-1, 1) + 1) / 2 * 255).round().permute(0, 2, 3, 1).numpy()
            got = batch.decoded_images[:, slot].astype(np.float64)
            assert np.abs(got - want).max() <= 1, f"step {step}"        # uint8 rounding of the same floats
    assert sigma == 0.0 and not np.array_equal(batch.decoded_images[:, -1], rgb)   # a reconstruction, not the render
