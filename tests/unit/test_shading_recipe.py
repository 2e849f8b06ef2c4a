"""The replication's shading recipe as options: inverse shading resized (anti-aliased) before it is
uninverted, and the z-score of another task or fixed constants; shading_replication.yaml composes them."""
from __future__ import annotations

import numpy as np
import pytest

from probes.contract import ProbeSpec
from probes.labels import build_labeler
from probes.labels.intrinsic import resize_antialiased, uninvert
from probes.tasks import REFERENCE_DEPTH_NORM, check_target_norm, resolve_target_stats
from tests.e2e.test_cli import run_inprocess
from tests.unit.test_labelers_neural import _fake_intrinsic, _smooth_images


def test_antialiased_resize_averages_instead_of_aliasing():
    checker = (np.indices((128, 128)).sum(0) % 2 * 0.9 + 0.05).astype(np.float32)   # 0.05 / 0.95 pixels
    small = resize_antialiased(checker, (32, 32))
    assert small.shape == (32, 32) and np.allclose(small, 0.5, atol=0.02)
    np.testing.assert_array_equal(resize_antialiased(checker, (128, 128)), checker)   # same size: untouched


def test_resize_before_uninvert_is_the_replications_order(monkeypatch):
    checker = (np.indices((128, 128)).sum(0) % 2 * 0.9 + 0.05).astype(np.float32)
    _fake_intrinsic(monkeypatch, checker)
    images = _smooth_images(1, 64)
    replication = build_labeler("intrinsic", resize_before_uninvert=True)(images)[0]
    np.testing.assert_allclose(replication, uninvert(resize_antialiased(checker, (64, 64))), rtol=1e-6)
    protocol = build_labeler("intrinsic")(images)[0]
    # uninverting first averages 1/0.05-1 = 19 with 1/0.95-1 ~ 0.05; resizing first uninverts ~0.5 -> ~1
    assert np.allclose(replication, 1.0, atol=0.1) and protocol.mean() > 5


def test_recipe_option_changes_the_label_fingerprint_only_when_on():
    base = build_labeler("intrinsic").fingerprint()
    assert build_labeler("intrinsic", resize_before_uninvert=False).fingerprint() == base   # old caches stay valid
    assert build_labeler("intrinsic", resize_before_uninvert=True).fingerprint() != base
    with pytest.raises(ValueError, match="true or false"):
        build_labeler("intrinsic", resize_before_uninvert="yes").cache_kwargs()


def test_target_norm_rules_are_checked_and_applied():
    tasks = ("foreground", "depth", "shading")
    rules = check_target_norm({"shading": "depth", "depth": {"mean": 15.740597, "std": 9.281932}}, tasks)
    measured = {"depth": {"mean": 3.0, "std": 2.0}, "shading": {"mean": 0.5, "std": 0.1}}
    assert resolve_target_stats(measured, rules) == {"depth": REFERENCE_DEPTH_NORM, "shading": {"mean": 3.0, "std": 2.0}}
    assert resolve_target_stats(measured, {"shading": "train"}) == measured
    for bad, match in [({"shading": "foreground"}, "neither"), ({"foreground": "train"}, "not a regression"),
                       ({"shading": {"mean": 1.0, "std": 0.0}}, "std > 0"), ({"shading": 3}, "must be"),
                       ({"shading": "shading"}, "neither")]:
        with pytest.raises(ValueError, match=match):
            check_target_norm(bad, tasks)


def test_one_pass_statistics_follow_the_rule():
    """Ridge probes measure statistics on the train stream later: the spec's rule still wins."""
    spec = ProbeSpec(layers=(), steps=(0,), timesteps=(999.0,), tasks=("shading",), label_size=(8, 8),
                     target_stats={}, model={}, is_random=True, store_dir="", target_norm={"shading": REFERENCE_DEPTH_NORM})
    assert dict(spec.with_target_stats({"shading": {"mean": 0.4, "std": 0.2}}).target_stats["shading"]) == \
        REFERENCE_DEPTH_NORM
    assert ProbeSpec.from_dict(spec.to_dict()).target_norm["shading"]["std"] == pytest.approx(9.281932)


def test_shading_replication_config_composes_only_its_differences():
    text = run_inprocess("fit", "--config", "configs/sd14/shading_replication.yaml", "--print_config")
    for needle in ("source: replication2024", "resize_before_uninvert: true", "mean: 15.740597", "std: 9.281932",
                   "model_id: CompVis/stable-diffusion-v1-4", "steps: 15", "name: intrinsic"):
        assert needle in text, needle
    protocol = run_inprocess("fit", "--config", "configs/sd14/shading.yaml", "--print_config")
    assert "source: chen2023" in protocol and "resize_before_uninvert" not in protocol and "mean: 15.74" not in protocol
