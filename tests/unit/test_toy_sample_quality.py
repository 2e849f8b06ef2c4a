"""Sample-quality measures of the toy model, checked on renders whose truth is known."""
from __future__ import annotations

import pytest

from probes.experiments.toy.sample_quality import caption_classes, sample_quality
from probes.toy.world import SHAPES, render_many


def test_caption_classes():
    assert caption_classes("a red sphere to the left of an orange cone") == {SHAPES.index("sphere"), SHAPES.index("cone")}
    assert caption_classes("") == set()


def test_renders_pass_and_blank_images_fail():
    pytest.importorskip("safetensors")
    from probes.labels.toy_nets import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "MANIFEST.sha256").exists():
        pytest.skip("toy labelers not shipped")
    batch = render_many(16, seed=4242)
    q = sample_quality(batch["rgb"], batch["captions"])
    assert q["object_found"] >= 0.9 and q["class_named"] >= 0.8
    blank = batch["rgb"].copy()
    blank[:] = 128
    assert sample_quality(blank, batch["captions"])["object_found"] <= 0.2
