"""What the exact-label protocol adds to configs: scene ids in toy prompt CSVs and ``generation.start``."""
from __future__ import annotations

import csv

import pytest

from probes.generation.sampling import GenerationSpec
from probes.paths import data_path
from probes.toy.prompts import scene_id, scene_of, toy_prompts, write_prompt_csv
from probes.toy.world import scene_for


def test_scene_ids_name_the_scene_of_each_toy_prompt(tmp_path):
    path = write_prompt_csv(tmp_path / "p.csv", 5, scene_seed=31, world="v1")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], int(r["seed"])) for r in rows] == toy_prompts(5, 31, world="v1")
    for i, r in enumerate(rows):
        assert r["id"] == scene_id("v1", 31, i) == f"v1:31:{i}"
        assert scene_of(r["id"]) == scene_for(31, i, world="v1")
        assert scene_of(r["id"]).caption() == r["prompt"]


def test_the_shipped_toy_prompts_name_their_scenes():
    with open(data_path("prompts", "toy.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [scene_id("v2", 777, i) for i in range(256)]


@pytest.mark.parametrize("bad", ["", "v2:777", "v9:1:2", "v2:x:2", "v2:1:-2"])
def test_a_bad_scene_id_is_named_with_the_fix(bad):
    with pytest.raises(ValueError, match="toy-prompts"):
        scene_of(bad)


def test_generation_start_is_checked_and_leaves_sampled_stores_fingerprints_alone():
    assert "start" not in GenerationSpec().fingerprint_fields()            # stores made before it keep their name
    assert GenerationSpec(start="renders").fingerprint_fields()["start"] == "renders"
    with pytest.raises(ValueError, match="noise | renders"):
        GenerationSpec(start="render")
    with pytest.raises(ValueError, match="set generation.decode=noisy"):
        GenerationSpec(start="renders", decode="x0")
    assert GenerationSpec(start="renders", decode="noisy").decode == "noisy"   # the render's own path, decoded
