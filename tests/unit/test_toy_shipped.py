"""The shipped toy weights, their recipes and every default that must follow them name one world."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict

import pytest
import yaml

from probes.labels import toy_nets
from probes.paths import REPO_ROOT, data_path
from probes.recipes.toy_labelers import train as labelers_recipe
from probes.toy.prompts import toy_prompts
from probes.toy.world import SHIPPED_WORLD, WORLDS


def _shipped(folder: str, marker: str):
    path = data_path("toy", folder)
    if not (path / marker).exists():
        pytest.skip(f"no shipped {path} (make toy-model)")
    return path


def test_shipped_world_is_the_models_and_the_labelers():
    assert SHIPPED_WORLD in WORLDS
    assert toy_nets.trained_world(_shipped("labelers", "MANIFEST.sha256")) == SHIPPED_WORLD
    recipe = (_shipped("model", "RECIPE.md") / "RECIPE.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", recipe, re.S).group(1))
    assert config["data"]["world"] == SHIPPED_WORLD
    assert yaml.safe_load((REPO_ROOT / "configs/toy/model.yaml").read_text())["data"]["world"] == SHIPPED_WORLD


def test_shipped_labelers_were_trained_by_the_labelers_config():
    """``make toy-model`` trains the labelers from configs/toy/labelers.yaml: it must be the recipe the
    shipped networks record (each network's own fields, as the trainer compares them)."""
    root = _shipped("labelers", "MANIFEST.sha256")
    cfg = yaml.safe_load((REPO_ROOT / "configs/toy/labelers.yaml").read_text())
    recipe = asdict(labelers_recipe.Recipe(**cfg["recipe"]))
    for name, file in toy_nets.FILES.items():
        trained = json.loads((root / file).with_suffix(".json").read_text())["recipe"]
        assert labelers_recipe.relevant(trained, name) == labelers_recipe.relevant(recipe, name), name


def test_demo_prompt_set_is_captions_of_the_shipped_world():
    with open(data_path("prompts", "toy.csv")) as f:
        rows = [(r["prompt"], int(r["seed"])) for r in csv.DictReader(f)]
    assert len(rows) == 256 and rows == toy_prompts(256)
    assert rows != toy_prompts(256, world="v1")       # V1 stays selectable, and draws other scenes


@pytest.mark.parametrize("name, n", [("toy.csv", 256), ("toy_experiment.csv", 1000)])
def test_shipped_toy_prompts_give_one_object_scenes_their_shape(name, n):
    """The classifier in the demo's run is scored against these: the shape of the scene's only object,
    in the classifier's output order, and no class where the caption names several objects."""
    from probes.prompts.sets import PromptSpec, load_prompts
    from probes.toy.world import SHAPES

    records = load_prompts(PromptSpec(source=str(data_path("prompts", name))))
    assert len(records) == n
    one = [r for r in records if " to the left of " not in r.prompt and " and " not in r.prompt]
    assert 0 < len(one) < n
    for r in records:
        if r in one:
            assert r.label == SHAPES.index(r.prompt.split()[-1]), r.prompt
        else:
            assert r.label is None, r.prompt
