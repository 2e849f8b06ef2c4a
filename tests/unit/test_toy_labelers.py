"""Toy labelers: shipped weights are the manifest's, training resumes exactly, and the shipped
foreground net really segments held-out renders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from probes.common.hashing import sha256_file
from probes.labels import toy_nets as labelers
from probes.metrics.maps import dice_per_image, spearman_per_image
from probes.recipes.toy_labelers import train as cli
from probes.toy.world import render_many

SHIPPED = labelers.WEIGHTS_DIR


def _shipped() -> Path:
    if not (SHIPPED / "MANIFEST.sha256").exists():
        pytest.skip(f"no shipped toy labelers in {SHIPPED} (build them with `make toy-model`)")
    return SHIPPED


def load_toy_net(kind: str) -> torch.nn.Module:
    return labelers.load_toy_net(kind, _shipped())


def test_shipped_weights_match_manifest_and_load():
    root = _shipped()
    manifest = labelers.read_manifest(root)
    assert set(manifest) == set(labelers.FILES.values())
    for name, digest in manifest.items():
        assert sha256_file(root / name) == digest
    x = torch.rand(2, 3, 64, 64)
    for kind in labelers.DENSE_KINDS:
        assert load_toy_net(kind).training is False
        assert load_toy_net(kind)(x).shape == (2, 1, 64, 64)
    assert load_toy_net("classifier")(x).shape == (2, 4)


def test_tampered_weights_are_refused_with_the_fix(tmp_path):
    root = _shipped()
    for f in ("MANIFEST.sha256", "dense.safetensors", "dense.json"):
        (tmp_path / f).write_bytes((root / f).read_bytes())
    tensors = load_file(str(tmp_path / "dense.safetensors"))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(tmp_path / "dense.safetensors"))
    with pytest.raises(ValueError, match=r"dense\.safetensors.*make toy-model"):
        labelers.load_toy_net("foreground", tmp_path)
    with pytest.raises(FileNotFoundError, match="make toy-model"):
        labelers.load_toy_net("classifier", tmp_path)


def test_shipped_foreground_net_segments_held_out_renders():
    root = _shipped()
    d = render_many(16, seed=987_654, fields=("rgb", "foreground", "inv_depth"))
    prob = labelers.predict("foreground", d["rgb"], root)
    assert prob.shape == (16, 64, 64) and prob.dtype == np.float32
    assert dice_per_image(prob >= 0.5, d["foreground"]).mean() > 0.8
    depth = labelers.predict("depth", d["rgb"], root)
    assert np.nanmean(spearman_per_image(depth, d["inv_depth"])) > 0.5
    assert labelers.predict("classifier", d["rgb"], root).shape == (16, 4)
    # Another image size: maps come back at that size.
    big = np.repeat(np.repeat(d["rgb"][:2], 2, axis=1), 2, axis=2)
    assert labelers.predict("shading", big, root).shape == (2, 128, 128)


TINY = cli.Recipe(seed=3, scenes=8, dense_steps=4, classifier_steps=2, batch=4,
                  checkpoint_every=2, threads=1)


def test_tiny_training_runs_and_resumes_to_identical_weights(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli.train(whole, TINY, eval_n=2)
    first = cli.train(split, TINY, eval_n=2, stop_after=2)          # "killed" after step 2
    assert first == [{"net": "dense", "steps": 2, "resumed_from": 0,
                      "train_seconds": first[0]["train_seconds"]}]
    assert (split / ".checkpoints" / "dense.pt").exists()
    assert not (split / "dense.safetensors").exists()
    second = cli.train(split, TINY, eval_n=2)
    assert second[0]["resumed_from"] == 2 and second[0]["steps"] == 4
    assert not (split / ".checkpoints").exists()
    for name in labelers.FILES.values():
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The written folder is a loadable labeler set, and a rerun does not retrain.
    assert labelers.predict("depth", render_many(2, 1, fields=["rgb"])["rgb"], split).shape \
        == (2, 64, 64)
    assert json.loads((split / "eval.json").read_text())["n_images"] == 2
    mtime = (split / "dense.safetensors").stat().st_mtime_ns
    cli.train(split, TINY, eval_n=2)
    assert (split / "dense.safetensors").stat().st_mtime_ns == mtime
    assert "sha256sum -c" in (split / "RECIPE.md").read_text()
