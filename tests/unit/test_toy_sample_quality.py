"""Sample-quality measures of the toy model, checked on renders whose truth is known: the exact
images must pass, captions that do not belong to them must fall to chance."""
from __future__ import annotations

import numpy as np
import pytest

from probes.experiments.toy.sample_quality import (
    MIN_OBJECT_PIXELS,
    caption_classes,
    colour_layout,
    measures,
    parse_caption,
    pixel_colours,
    quality_markdown,
    sample_quality,
)
from probes.toy.world import COLOURS, PALETTE, SHAPES, render_many


def test_caption_classes():
    assert caption_classes("a red sphere to the left of an orange cone") == {SHAPES.index("sphere"), SHAPES.index("cone")}
    assert caption_classes("") == set()


def test_parse_caption():
    assert parse_caption("a red sphere to the left of an orange cone") == [("red", "sphere"), ("orange", "cone")]
    assert parse_caption("a blue cube") == [("blue", "cube")]
    assert parse_caption("a photo of a dog") is None
    assert parse_caption("a pink cube") is None


def test_pixel_colours_ignore_shading_and_grey():
    shades = np.array([0.15, 0.4, 0.7, 1.0])
    pal = np.array([PALETTE[c] for c in COLOURS], float)
    img = np.rint(pal[None, :, :] * shades[:, None, None]).astype(np.uint8)[None]   # [1, 4, 6, 3]
    got = pixel_colours(img)[0]
    assert (got == np.arange(len(COLOURS))[None, :]).all()
    grey = np.array([[[128, 128, 128], [199, 199, 194], [5, 0, 0]]], np.uint8)[None]   # ground, wall, near black
    assert (pixel_colours(grey) == -1).all()


def test_colour_layout_counts_and_columns():
    img = np.full((1, 8, 16, 3), 128, np.uint8)
    img[0, 2:6, 1:4] = PALETTE["red"]
    img[0, 2:6, 10:14] = PALETTE["blue"]
    fg = (img != 128).any(-1)
    counts, cols = colour_layout(img, fg)
    r, b = COLOURS.index("red"), COLOURS.index("blue")
    assert counts[0, r] == 12 and counts[0, b] == 16 and counts[0].sum() == 28
    assert cols[0, r] == pytest.approx(2.0) and cols[0, b] == pytest.approx(11.5)
    assert np.isnan(cols[0, COLOURS.index("green")])
    fg[:] = False                      # what the foreground mask leaves out does not vote
    assert colour_layout(img, fg)[0].sum() == 0


def _weights():
    pytest.importorskip("safetensors")
    from probes.labels.toy_nets import WEIGHTS_DIR, trained_world

    if not (WEIGHTS_DIR / "MANIFEST.sha256").exists():
        pytest.skip("toy labelers not shipped")
    return WEIGHTS_DIR, trained_world(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def renders():
    weights, world = _weights()
    batch = render_many(60, seed=4242, max_objects=2, world=world)
    return weights, batch


def _other(caption: str, colour_shift: int = 0, shape_shift: int = 0, reverse: bool = False) -> str:
    objs = parse_caption(caption)
    objs = [(COLOURS[(COLOURS.index(c) + colour_shift) % len(COLOURS)],
             SHAPES[(SHAPES.index(s) + shape_shift) % len(SHAPES)]) for c, s in objs]
    if reverse:
        objs = objs[::-1]
    return " to the left of ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in objs)


def test_renders_pass_their_own_captions(renders):
    weights, batch = renders
    m = measures(batch["rgb"], batch["captions"], weights)
    assert m["shape_named"].n >= 15 and m["relation_holds"].n >= 15
    assert m["shape_named"].rate >= 0.85
    assert m["colour_named"].rate >= 0.95
    assert m["relation_holds"].rate >= 0.9
    for name in ("shape_named", "colour_named", "relation_holds"):
        r = m[name]
        assert r.low <= r.rate <= r.high and r.hits <= r.n
        assert 0.0 < r.chance < 0.6


def test_wrong_captions_fail(renders):
    weights, batch = renders
    caps = batch["captions"]
    wrong_colour = measures(batch["rgb"], [_other(c, colour_shift=1) for c in caps], weights)
    assert wrong_colour["colour_named"].rate <= 0.05
    assert wrong_colour["relation_holds"].rate <= 0.2       # the colours it looks for are not there
    wrong_shape = measures(batch["rgb"], [_other(c, shape_shift=1) for c in caps], weights)
    assert wrong_shape["shape_named"].rate <= 0.2
    reversed_ = measures(batch["rgb"], [_other(c, reverse=True) for c in caps], weights)
    assert reversed_["relation_holds"].rate <= 0.1


def test_shuffled_captions_score_near_chance(renders):
    weights, batch = renders
    caps = list(batch["captions"])
    one = [i for i, c in enumerate(caps) if len(parse_caption(c)) == 1]
    two = [i for i, c in enumerate(caps) if len(parse_caption(c)) == 2]
    shuffled = list(caps)
    for group in (one, two):                                 # keep each caption's object count
        for i, j in zip(group, np.roll(group, 7)):
            shuffled[i] = caps[j]
    m = measures(batch["rgb"], shuffled, weights)
    for name in ("shape_named", "colour_named"):
        r = m[name]
        assert r.low <= r.chance + 0.1 and r.rate <= 0.5, (name, r)
    assert m["relation_holds"].rate <= 0.4


def test_blank_images_fail_and_flat_dict(renders):
    weights, batch = renders
    blank = np.full_like(batch["rgb"], 128)
    q = sample_quality(blank, batch["captions"], weights)
    assert q["object_found"] <= 0.2 and q["colour_named"] == 0.0 and q["relation_holds"] == 0.0
    assert q["images"] == len(blank)
    assert {"shape_named_n", "shape_named_low", "shape_named_high", "shape_named_chance"} <= set(q)
    table = quality_markdown({"blank": q})
    assert table.count(" 0.0% [0.0%, ") == 2 and "| blank | " in table and "chance" in table
    with pytest.raises(ValueError, match="captions"):
        measures(batch["rgb"][:3], batch["captions"][:2], weights)


def test_min_object_pixels_is_the_labelers():
    from probes.labels.toy_nets import MIN_VISIBLE_PIXELS

    assert MIN_OBJECT_PIXELS == MIN_VISIBLE_PIXELS
