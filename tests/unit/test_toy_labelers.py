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
    d = render_many(16, seed=987_654, fields=("rgb", "foreground", "inv_depth"),
                    world=labelers.trained_world(root))
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
                      "train_seconds": first[0]["train_seconds"],
                      "cpu_seconds": first[0]["cpu_seconds"]}]
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


TINY_V2 = cli.Recipe(seed=3, scenes=8, dense_steps=4, classifier_steps=2, batch=4,
                     checkpoint_every=2, threads=1, world="v2", dense_widths="8,8,16",
                     classifier_widths="8,8", blur=1.5, noise=0.05, rotate=True,
                     vae_share=0.5, vae_scenes=4, shading_weight=20.0, shading_grad_weight=5.0)


def test_v2_training_with_augmentation_resumes_and_scores_reconstructions(tmp_path):
    from probes.diffusion.toy_vae import build_vae

    arch = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
            "block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4}
    build_vae(arch, seed=1).save_pretrained(tmp_path / "vae")
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli.train(whole, TINY_V2, eval_n=2, vae=tmp_path / "vae")
    cli.train(split, TINY_V2, eval_n=2, stop_after=3, vae=tmp_path / "vae")
    cli.train(split, TINY_V2, eval_n=2, vae=tmp_path / "vae")
    for name in labelers.FILES.values():
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert json.loads((whole / "dense.json").read_text())["widths"] == [8, 8, 16]
    assert labelers.trained_world(whole) == "v2"
    scores = json.loads((whole / "eval.json").read_text())
    assert [s["images"] for s in scores] == ["renders", "VAE reconstructions"]
    assert all(s["world"] == "v2" and s["seed"] == cli.EVAL_SEED for s in scores)
    text = (whole / "RECIPE.md").read_text()
    assert "| renders | VAE reconstructions |" in text and "quarter turns" in text
    assert "s CPU" in text and "VAE round trip of the same render" in text and "sha256 `" in text


def test_batches_keep_labels_on_their_pixels():
    """Flips, quarter turns, blur and noise move or soften the image; the labels must follow the
    turns and flips exactly: object pixels (foreground) are the coloured ones."""
    d = render_many(6, seed=5, fields=cli.FIELDS, world="v2")
    data = cli.training_tensors(d)
    recipe = cli.Recipe(batch=6, rotate=True)
    b = cli._batch(data, recipe, "dense", step=1)
    x = b["x"].permute(0, 2, 3, 1).numpy()
    saturation = (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6)
    fg = b["foreground"].numpy().astype(bool)
    assert (saturation[fg] > 0.5).mean() > 0.97 and (saturation[~fg] < 0.1).mean() > 0.99
    assert not torch.equal(b["x"], cli._batch(data, cli.Recipe(batch=6), "dense", step=1)["x"])
    blurred = cli._batch(data, cli.Recipe(batch=6, rotate=True, blur=2.0, noise=0.0), "dense", step=1)
    assert torch.equal(blurred["foreground"], b["foreground"])
    # a blur lowers the picture's total variation, and never moves it off [0, 1]
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().sum()   # noqa: E731
    assert tv(blurred["x"]) < tv(b["x"]) and 0 <= blurred["x"].min() and blurred["x"].max() <= 1


def test_held_out_seeds_and_bad_settings_are_refused(tmp_path):
    for seed in (cli.EVAL_SEED, cli.VAL_SEED):
        with pytest.raises(ValueError, match="held-out"):
            cli.render_training_set(cli.Recipe(seed=seed, scenes=1))
    with pytest.raises(ValueError, match="unknown world"):
        cli.train(tmp_path, cli.Recipe(world="v3", scenes=1))
    with pytest.raises(ValueError, match="comma-separated"):
        cli.train(tmp_path, cli.Recipe(dense_widths="8;16", scenes=1))
    with pytest.raises(ValueError, match="--vae"):
        cli.train(tmp_path, cli.Recipe(vae_share=0.5, scenes=1))
    data = cli.training_tensors(render_many(2, seed=5, fields=cli.FIELDS))
    with pytest.raises(ValueError, match="--vae"):
        cli._batch(data, cli.Recipe(batch=2, vae_share=0.5), "dense", step=0)


def test_vae_share_swaps_in_round_trips_and_leaves_them_undegraded():
    data = cli.training_tensors(render_many(4, seed=5, fields=cli.FIELDS, world="v2"))
    data["x_vae"] = torch.full_like(data["x"][:2], 100)           # round trips of scenes 0 and 1
    b = cli._batch(data, cli.Recipe(batch=4, vae_share=1.0, blur=1.0, noise=0.05, rotate=True),
                   "dense", step=0)
    plain = cli._batch(data, cli.Recipe(batch=4), "dense", step=0)
    swapped = (b["x"] == 100 / 255).flatten(1).all(1)
    assert swapped.sum() == 2                                      # only scenes with a round trip
    assert not (plain["x"] == 100 / 255).flatten(1).all(1).any()


def test_gradient_loss_ignores_offsets_and_sees_steps():
    true = torch.linspace(0, 1, 64).repeat(2, 64, 1)                 # a smooth ramp
    assert cli._gradient_mse(true + 0.3, true).item() == pytest.approx(0.0, abs=1e-12)
    step = true.clone()
    step[..., 32:] += 0.05                                           # a tile edge leaking in
    assert cli._gradient_mse(step, true).item() > 0


def test_changing_one_networks_settings_retrains_only_that_network(tmp_path):
    cli.train(tmp_path, TINY, eval_n=2)
    dense_mtime = (tmp_path / "dense.safetensors").stat().st_mtime_ns
    clf_mtime = (tmp_path / "classifier.safetensors").stat().st_mtime_ns
    longer = cli.Recipe(**{**cli.asdict(TINY), "classifier_steps": 3})
    summaries = cli.train(tmp_path, longer, eval_n=2)
    assert [s["net"] for s in summaries] == ["dense", "classifier"]
    assert (tmp_path / "dense.safetensors").stat().st_mtime_ns == dense_mtime
    assert (tmp_path / "classifier.safetensors").stat().st_mtime_ns != clf_mtime
    assert json.loads((tmp_path / "classifier.json").read_text())["steps"] == 3
    assert sha256_file(tmp_path / "classifier.safetensors") in (tmp_path / "MANIFEST.sha256").read_text()
    other_data = cli.Recipe(**{**cli.asdict(TINY), "scenes": 9})   # shared field: both retrain
    cli.train(tmp_path, other_data, eval_n=2)
    assert (tmp_path / "dense.safetensors").stat().st_mtime_ns != dense_mtime


def test_a_net_first_loaded_under_inference_mode_serves_autograd_later():
    """The demo's classifier stage loads the shared net inside Lightning's inference mode; the
    intervention's loss then runs it with autograd on."""
    labelers._load_net.cache_clear()
    try:
        with torch.inference_mode():
            load_toy_net("classifier")
        x = torch.rand(1, 3, 64, 64, requires_grad=True)
        load_toy_net("classifier")(x).sum().backward()
        assert x.grad is not None
    finally:
        labelers._load_net.cache_clear()
