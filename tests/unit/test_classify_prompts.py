"""Class-labelled prompt sets: the shipped ImageNet fruit and toy sets, and the class_index column."""
from __future__ import annotations

import csv
from collections import Counter

import pytest

from probes.experiments.classify.imagenet import FRUIT, class_index, imagenet_categories, imagenet_class_prompts
from probes.experiments.classify.prompt_sets import class_prompt_rows, toy_class_prompts, write_prompt_csv
from probes.paths import data_path
from probes.prompts.sets import PromptSpec, load_prompts
from probes.toy.world import COLOURS, SHAPES


def _shipped_rows(name: str) -> list[dict[str, object]]:
    with open(data_path("prompts", f"{name}.csv"), newline="", encoding="utf-8") as f:
        return [dict(r, seed=int(r["seed"]), class_index=int(r["class_index"])) for r in csv.DictReader(f)]


def test_imagenet_names_come_from_torchvision_metadata():
    cats = imagenet_categories()
    assert len(cats) == 1000
    assert [class_index(n) for n in ("Granny Smith", "granny smith", "lemon", "pomegranate")] == [948, 948, 951, 957]
    assert class_index(954) == 954
    with pytest.raises(ValueError, match="did you mean 'lemon'"):
        class_index("lemmon")
    with pytest.raises(ValueError, match="0..999"):
        class_index(1000)


def test_imagenet_prompts_use_the_template_and_article():
    assert imagenet_class_prompts(["orange", 951], "a photo of {article} {name}") == [
        (950, "a photo of an orange"), (951, "a photo of a lemon")]
    assert imagenet_class_prompts(["fig"], "{name}") == [(952, "fig")]
    with pytest.raises(ValueError, match="twice"):
        imagenet_class_prompts(["lemon", 951])
    with pytest.raises(ValueError, match="name"):
        imagenet_class_prompts(["lemon"], "a photo")


def test_shipped_imagenet_fruit_set_is_what_the_builder_makes():
    want = class_prompt_rows(imagenet_class_prompts(FRUIT), seeds_per_prompt=8, test_per_prompt=4, first_seed=0)
    assert _shipped_rows("imagenet_fruit") == want


def test_shipped_imagenet_fruit_set_loads_with_labels():
    records = load_prompts(PromptSpec(source="imagenet_fruit"))
    cats = imagenet_categories()
    assert len(records) == 80 and len({r.seed for r in records}) == 80
    for r in records:
        assert r.label is not None and r.prompt.endswith(" " + cats[r.label])
    test = Counter(r.label for r in records if r.split == "test")
    assert set(test) == {class_index(n) for n in FRUIT} and min(test.values()) >= 4
    assert {r.split for r in records} == {"train", "val", "test"}


def test_shipped_toy_set_is_in_the_caption_form_and_labelled_by_shape():
    assert _shipped_rows("toy_classes") == class_prompt_rows(toy_class_prompts(), 4, 2, 5000)
    records = load_prompts(PromptSpec(source="toy_classes"))
    assert len(records) == len(SHAPES) * len(COLOURS) * 4
    for r in records:
        article, colour, shape = r.prompt.split()
        assert colour in COLOURS and article == ("an" if colour[0] in "aeiou" else "a")
        assert r.label == SHAPES.index(shape)
    test = Counter(r.label for r in records if r.split == "test")
    assert test == {k: 2 * len(COLOURS) for k in range(len(SHAPES))}


def test_one_object_caption_is_the_toy_prompt():
    from probes.toy.world import scene_for

    for i in range(40):
        scene = scene_for(99, i, max_objects=1)
        obj = scene.objects[0]
        assert (SHAPES.index(obj.shape), scene.caption()) in toy_class_prompts()


def test_labels_round_trip_and_stay_optional(tmp_path):
    rows = class_prompt_rows([(3, "a photo of a cat"), (7, "a photo of a dog")], 3, 1, first_seed=10)
    assert [r["split"] for r in rows] == ["train", "train", "test"] * 2
    path = write_prompt_csv(tmp_path / "labelled.csv", rows)
    records = load_prompts(PromptSpec(source=str(path), val_fraction=0.0))
    assert [(r.prompt, r.seed, r.split, r.label) for r in records] == [
        (r["prompt"], r["seed"], r["split"], r["class_index"]) for r in rows]
    plain = tmp_path / "plain.csv"
    plain.write_text("prompt,seed\na cat,1\na dog,2\n")
    assert [r.label for r in load_prompts(PromptSpec(source=str(plain)))] == [None, None]
    blank = tmp_path / "blank.csv"
    blank.write_text("prompt,seed,class_index\na cat,1,5\na dog,2,\n")
    assert [r.label for r in load_prompts(PromptSpec(source=str(blank)))] == [5, None]


@pytest.mark.parametrize("value", ["lemon", "-1", "2.5"])
def test_bad_class_index_names_file_line_and_value(tmp_path, value):
    path = tmp_path / "bad.csv"
    path.write_text(f"prompt,seed,class_index\na cat,1,3\na dog,2,{value}\n")
    with pytest.raises(ValueError, match=rf"bad.csv, line 3: column 'class_index' holds '{value}'"):
        load_prompts(PromptSpec(source=str(path)))


def test_builder_rejects_impossible_splits():
    with pytest.raises(ValueError, match="test_per_prompt"):
        class_prompt_rows([(0, "a cat")], 2, 3)
    with pytest.raises(ValueError, match="negative"):
        class_prompt_rows([(-1, "a cat")], 2, 1)
