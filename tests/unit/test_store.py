"""Activation store: atomic per-sample commits, resume after a crash, manifest, disk budget, label cache."""
from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest

from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.labels import build_labeler
from probes.labels.base import Labeler, register_labeler
from probes.labels.cache import LabelCache
from probes.prompts.sets import PromptSpec, load_prompts
from probes.store.activations import ActivationStore, CommitLog, InsufficientDisk
from probes.training.datamodule import ensure_store

TINY = DiffusionSpec(source="random", architecture="tiny")
GEN = GenerationSpec(steps=4, batch_size=2)
CAP = CaptureSpec(layers=["down1.*", "mid.0"], steps=[0, 2, 3])


def make(tmp, prompts_file, name, **kw):
    recs = load_prompts(PromptSpec(source=str(prompts_file), limit=None))[:6]
    return ensure_store(tmp / name, recs, kw.get("diffusion", TINY), kw.get("gen", GEN), kw.get("cap", CAP), "cpu",
                        progress=False), recs


def test_store_roundtrip_and_manifest(tmp_path, prompts_file):
    store, recs = make(tmp_path, prompts_file, "a")
    m = store.manifest
    assert m["num_samples"] == 6 and store.missing() == []
    assert [l["name"] for l in m["capture"]["layers"]] == ["down1.0", "down1.1", "mid.0"]
    assert m["capture"]["steps"] == [0, 2, 3] and len(m["capture"]["timesteps"]) == 3
    assert m["capture"]["timesteps"] == [m["capture"]["all_timesteps"][s] for s in (0, 2, 3)]
    assert m["model"]["model_id"] == "random:tiny" and m["code_version"]
    assert m["prompts"][2]["seed"] == recs[2].seed and m["capture"]["dtype"] == "float16"
    a = store.activation("down1.0", 3)
    assert isinstance(a, np.memmap) and a.shape == (3, 1, 64, 32) and a.dtype == np.float16
    assert store.image(0).shape == (128, 128, 3) and store.image(0).dtype == np.uint8
    assert store.commits.record(4)["prompt"] == recs[4].prompt
    with pytest.raises(KeyError, match="stored: down1.0, down1.1, mid.0"):
        store.activation("up3.0", 0)


def test_interrupted_generation_resumes_to_the_clean_result(tmp_path, prompts_file, monkeypatch):
    clean, _ = make(tmp_path, prompts_file, "clean")
    real_mark, calls = CommitLog.mark, collections.Counter()

    def crash_on_third(self, index, record=None):
        calls["n"] += 1
        if calls["n"] == 3:  # data of the second batch is written and synced, its markers are not
            raise KeyboardInterrupt("simulated crash")
        return real_mark(self, index, record)

    monkeypatch.setattr(CommitLog, "mark", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, prompts_file, "resumed")
    monkeypatch.setattr(CommitLog, "mark", real_mark)
    partial = ActivationStore(tmp_path / "resumed")
    assert partial.missing() == [2, 3, 4, 5]  # sample 2's data is on disk but it is not valid
    assert np.any(partial.images.array()[2])
    resumed, _ = make(tmp_path, prompts_file, "resumed")
    assert resumed.missing() == []
    assert np.array_equal(resumed.images.array(), clean.images.array())
    for name in clean.layer_names:
        assert np.array_equal(resumed.acts[name].array(), clean.acts[name].array()), name


def test_store_refuses_other_settings(tmp_path, prompts_file):
    make(tmp_path, prompts_file, "s")
    with pytest.raises(ValueError, match="differs in: capture"):
        make(tmp_path, prompts_file, "s", cap=CaptureSpec(layers=["mid.0"]))


def test_disk_budget_is_checked_before_starting(tmp_path, prompts_file, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InsufficientDisk, match=r"needs [0-9.]+ KB at .* but only 1.0 KB is free"):
        make(tmp_path, prompts_file, "full")
    assert not (tmp_path / "full" / "manifest.json").exists()


def test_required_bytes_of_the_sd14_protocol():
    """The issue's figure: ~345 MB per image (16 layers x 15 steps, cond half, fp16), ~213 GB for 617."""
    chans = {"down0": (4096, 320), "down1": (1024, 640), "down2": (256, 1280), "mid": (64, 1280),
             "up1": (256, 1280), "up2": (1024, 640), "up3": (4096, 320)}
    counts = {"down0": 2, "down1": 2, "down2": 2, "mid": 1, "up1": 3, "up2": 3, "up3": 3}
    layers = [{"name": f"{b}.{j}", "grid": [int(t ** 0.5)] * 2, "channels": c}
              for b, (t, c) in chans.items() for j in range(counts[b])]
    manifest = {"num_samples": 617, "generation": {"height": 512, "width": 512},
                "capture": {"layers": layers, "steps": list(range(15)), "halves": ["cond"], "dtype": "float16"}}
    per_image = ActivationStore.required_bytes(manifest) / 617 - 512 * 512 * 3
    assert per_image == pytest.approx(345e6, rel=0.01)
    assert ActivationStore.required_bytes(manifest) == pytest.approx(213e9, rel=0.01)


@register_labeler("_counting")
class CountingLabeler(Labeler):
    calls = 0

    def __call__(self, images, indices=None):
        type(self).calls += len(images)
        return images[..., 0].astype(np.float32) / 255.0


def test_label_cache_computes_each_label_once(tmp_path, prompts_file):
    store, _ = make(tmp_path, prompts_file, "l")
    CountingLabeler.calls = 0
    cache = LabelCache(store, "shading", build_labeler("_counting"))
    assert cache.ensure([0, 1, 2], progress=False) == 3
    assert cache.ensure(range(6), progress=False) == 3 and CountingLabeler.calls == 6
    again = LabelCache(store, "shading", build_labeler("_counting"))
    assert again.ensure(range(6), progress=False) == 0 and CountingLabeler.calls == 6
    np.testing.assert_allclose(again.array()[4], store.image(4)[..., 0] / 255.0, rtol=1e-5, atol=1e-6)   # float32 vs 64
    other = LabelCache(store, "shading", build_labeler("luminance", blur=3))
    assert other.root != cache.root  # another labeler or arguments: another cache entry
    assert json.loads((cache.root / "labeler.json").read_text())["name"] == "_counting"


def test_labeler_output_is_validated(tmp_path, prompts_file):
    store, _ = make(tmp_path, prompts_file, "v")

    @register_labeler("_bad")
    class Bad(Labeler):
        def __call__(self, images, indices=None):
            return np.zeros((len(images), 3, 3), np.float32)

    with pytest.raises(ValueError, match=r"returned \(2, 3, 3\); expected \(2, 128, 128\)"):
        LabelCache(store, "depth", build_labeler("_bad")).ensure([0, 1], progress=False)
