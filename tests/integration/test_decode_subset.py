"""Decoded x0 images are made (and stored) only for the test split, the only one that is labelled."""
from __future__ import annotations

import numpy as np

import probes.generation.sampling as sampling
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.generation.stage import ensure_store
from probes.models.layers import LayerRegistry
from probes.models.loading import DiffusionSpec
from probes.prompts.sets import PromptRecord

SPLITS = ["train", "train", "val", "test"]
RECS = [PromptRecord(index=i, prompt=f"a photo of a house {i}", seed=7 + i, split=s) for i, s in enumerate(SPLITS)]
GEN = GenerationSpec(steps=3, batch_size=4, decode_x0=True)
CAP = CaptureSpec(layers=["mid.0"])


def count_decodes(monkeypatch) -> list[int]:
    """Latents handed to the VAE, per call."""
    seen: list[int] = []
    real = sampling.decode_latents

    def counting(pipe, latents, chunk=8):
        seen.append(len(latents))
        return real(pipe, latents, chunk)

    monkeypatch.setattr(sampling, "decode_latents", counting)
    return seen


def test_generate_decodes_only_the_requested_samples(tiny_pipe, monkeypatch):
    lay = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)).select(["mid.0"])
    every = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False))[0]
    seen = count_decodes(monkeypatch)
    some = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False, decode=[1, 3]))[0]
    assert sum(seen) == 2 * 3                       # 2 images x 3 steps, not 4 x 3
    assert some.x0_indices == [1, 3] and some.x0_images.shape[0] == 2
    assert np.array_equal(some.x0_images, every.x0_images[[1, 3]])   # the same pixels as decoding everything
    assert np.array_equal(some.images, every.images)
    none = list(generate(tiny_pipe, RECS, range(4), GEN, lay, CAP, progress=False, decode=()))[0]
    assert none.x0_indices == [] and none.x0_images.shape[0] == 0


def test_store_decodes_and_stores_test_images_only(tmp_path, monkeypatch):
    seen = count_decodes(monkeypatch)
    store = ensure_store(tmp_path / "s", RECS, DiffusionSpec(source="random", architecture="tiny"), GEN, CAP,
                         "cpu", progress=False)
    assert sum(seen) == 1 * 3                       # the single test image, at each of the 3 steps
    x0 = np.asarray(store.x0_images.array())
    assert x0.shape[:2] == (4, 3)                   # the layout existing readers expect: [N, S, H, W, 3]
    assert x0[3].any() and not x0[:3].any()         # train/val rows never written (holes in a sparse file)
    assert [store.commits.record(i)["x0_decoded"] for i in range(4)] == [False, False, False, True]


def test_a_new_test_split_on_a_shared_store_gets_its_x0_images(tmp_path, monkeypatch):
    diffusion = DiffusionSpec(source="random", architecture="tiny")
    first = ensure_store(tmp_path / "s", RECS, diffusion, GEN, CAP, "cpu", progress=False)
    image0 = np.array(first.image(0))
    # same prompts and seeds (same store), but image 0 is now a test image (e.g. another test_fraction)
    resplit = [PromptRecord(index=r.index, prompt=r.prompt, seed=r.seed, split="test" if r.index == 0 else r.split)
               for r in RECS]
    seen = count_decodes(monkeypatch)
    store = ensure_store(tmp_path / "s", resplit, diffusion, GEN, CAP, "cpu", progress=False)
    assert sum(seen) == 1 * 3                       # only image 0 lacked them (image 3 is kept as it was)
    assert np.asarray(store.x0_images.array())[0].any() and store.commits.record(0)["x0_decoded"]
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
    x0 = np.asarray(dm.store.x0_images.array())
    others = [i for i in range(dm.store.num_samples) if i not in test]
    assert all(x0[i].any() for i in test) and not x0[others].any()
