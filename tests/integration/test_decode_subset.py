"""Decoded intermediate images are made (and stored) only for the test split, the only one that is labelled;
a store keeps which latent it decodes."""
from __future__ import annotations

import numpy as np
import pytest

import probes.generation.sampling as sampling
from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.prompts.sets import PromptRecord
from probes.store.fill import ensure_store
from probes.store.manifest import request_fingerprint, store_request

SPLITS = ["train", "train", "val", "test"]
RECS = [PromptRecord(index=i, prompt=f"a photo of a house {i}", seed=7 + i, split=s) for i, s in enumerate(SPLITS)]
GEN = GenerationSpec(steps=3, batch_size=4, decode="noisy")
CAP = CaptureSpec(layers=["mid.0"])


def count_decodes(monkeypatch) -> list[int]:
    """Latents handed to the VAE, per call."""
    seen: list[int] = []
    real = sampling.decode_latents

    def counting(pipe, latents, *args, **kwargs):
        seen.append(len(latents))
        return real(pipe, latents, *args, **kwargs)

    monkeypatch.setattr(sampling, "decode_latents", counting)
    return seen


def test_generate_decodes_only_the_requested_samples(tiny_pipe, monkeypatch):
    lay = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)).select(["mid.0"])
    every = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False))[0]
    seen = count_decodes(monkeypatch)
    some = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False, decode=[1, 3]))[0]
    assert sum(seen) == 2 * 3                       # 2 images x 3 steps, not 4 x 3
    assert some.decoded_indices == [1, 3] and some.decoded_images.shape[0] == 2
    assert np.array_equal(some.decoded_images, every.decoded_images[[1, 3]])   # the same pixels as decoding everything
    assert np.array_equal(some.images, every.images)
    none = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False, decode=()))[0]
    assert none.decoded_indices == [] and none.decoded_images.shape[0] == 0


def test_store_decodes_and_stores_test_images_only(tmp_path, monkeypatch):
    seen = count_decodes(monkeypatch)
    store = ensure_store(tmp_path / "s", RECS, DiffusionSpec(source="random", architecture="tiny"), GEN, CAP,
                         "cpu", progress=False)
    assert sum(seen) == 1 * 3                       # the single test image, at each of the 3 steps
    dec = np.asarray(store.decoded_images.array())
    assert store.decoded == "noisy" and store.decoded_images.path.name == "noisy_images.npy"
    assert dec.shape[:2] == (4, 3)                  # the layout existing readers expect: [N, S, H, W, 3]
    assert dec[3].any() and not dec[:3].any()       # train/val rows never written (holes in a sparse file)
    assert [store.commits.record(i)["decoded"] for i in range(4)] == [False, False, False, True]


def test_a_new_test_split_on_a_shared_store_gets_its_decoded_images(tmp_path, monkeypatch):
    diffusion = DiffusionSpec(source="random", architecture="tiny")
    first = ensure_store(tmp_path / "s", RECS, diffusion, GEN, CAP, "cpu", progress=False)
    image0 = np.array(first.image(0))
    # same prompts and seeds (same store), but image 0 is now a test image (e.g. another test_fraction)
    resplit = [PromptRecord(index=r.index, prompt=r.prompt, seed=r.seed, split="test" if r.index == 0 else r.split)
               for r in RECS]
    seen = count_decodes(monkeypatch)
    store = ensure_store(tmp_path / "s", resplit, diffusion, GEN, CAP, "cpu", progress=False)
    assert sum(seen) == 1 * 3                       # only image 0 lacked them (image 3 is kept as it was)
    assert np.asarray(store.decoded_images.array())[0].any() and store.commits.record(0)["decoded"]
    assert np.array_equal(np.array(store.image(0)), image0)   # regenerated bit-identically


def test_streaming_run_decodes_test_images_only(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from probes.prompts.sets import PromptSpec
    from probes.training.datamodule import ActivationDataModule
    from probes.training.ridge import RidgeProbeModule
    from tests.conftest import REPO

    seen = count_decodes(monkeypatch)
    dm = ActivationDataModule(diffusion=DiffusionSpec(source="random", architecture="tiny"),
                              prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=2, val_fraction=0.3),
                              generation=GEN, capture=CAP, labels={"depth": {"name": "vertical"}}, mode="streaming",
                              store_root=str(tmp_path), device="cpu", progress=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1)
    module = RidgeProbeModule()
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    test = list(dm.datasets["test"].indices)
    assert sum(seen) == len(test) * 3
    dec = np.asarray(dm.store.decoded_images.array())
    others = [i for i in range(dm.store.num_samples) if i not in test]
    assert all(dec[i].any() for i in test) and not dec[others].any()


def test_a_store_decoded_from_one_latent_is_never_reused_for_the_other(tmp_path):
    diffusion = DiffusionSpec(source="random", architecture="tiny")
    ensure_store(tmp_path / "s", RECS, diffusion, GEN, CAP, "cpu", progress=False)
    x0 = GenerationSpec(steps=3, batch_size=4, decode="x0")
    with pytest.raises(ValueError, match="made with other settings.*generation.decode"):
        ensure_store(tmp_path / "s", RECS, diffusion, x0, CAP, "cpu", progress=False)
    # default store folders are named by the fingerprint: each latent gets its own
    fps = {d: request_fingerprint(store_request(diffusion, GenerationSpec(steps=3, batch_size=4, decode=d), CAP, RECS))
           for d in ("none", "noisy", "x0")}
    assert len(set(fps.values())) == 3


def test_stores_made_before_the_decode_option_keep_their_fingerprint_and_latent():
    """The request is written with the pre-``decode`` key for none/x0: existing stores (hours of SD v1.4
    generation) keep their folders; their manifests (``decode_x0: true``) read as x0."""
    from probes.store.activations import decoded_latent

    diffusion = DiffusionSpec(source="random", architecture="tiny")
    for decode, old in (("none", False), ("x0", True)):
        gen = store_request(diffusion, GenerationSpec(steps=3, batch_size=4, decode=decode), CAP, RECS)["generation"]
        assert gen["decode_x0"] is old and "decode" not in gen
    assert decoded_latent({"decode_x0": True}) == "x0" and decoded_latent({"decode_x0": False}) == "none"
    assert decoded_latent({"decode": "noisy"}) == "noisy"
