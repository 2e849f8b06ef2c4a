"""The captions of ``diffusion-probes toy-quality``: fresh scenes, the counts asked for, two colours
in every two-object caption."""
from __future__ import annotations

import pytest

from probes.experiments.toy.quality_run import QUALITY_SCENE_SEED, quality_captions
from probes.experiments.toy.sample_quality import parse_caption
from probes.toy.prompts import PROMPT_SCENE_SEED


def test_counts_order_and_two_colours():
    caps = quality_captions(7, 5)
    objects = [parse_caption(c) for c in caps]
    assert [len(o) for o in objects] == [1] * 7 + [2] * 5
    assert all(o[0][0] != o[1][0] for o in objects[7:])
    assert caps == quality_captions(7, 5)                        # deterministic
    assert quality_captions(3, 2) == caps[:3] + caps[7:9]        # the first ones of each kind
    assert quality_captions(3, 2, world="v1") != quality_captions(3, 2)
    assert QUALITY_SCENE_SEED not in (0, PROMPT_SCENE_SEED)


def test_impossible_requests_name_the_fix():
    with pytest.raises(ValueError, match="ask for fewer"):
        quality_captions(50, 50, max_scenes=20)
    with pytest.raises(ValueError, match="unknown world"):
        quality_captions(1, 1, world="v9")
