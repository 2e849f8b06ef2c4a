"""Class-labelled prompt sets: ``prompt,seed,split,class_index`` CSVs for the classifier experiment.

Why: a classifier on decoded images can only be scored against the class the prompt asked for,
so each row carries that class's index in the classifier's output order; ``load_prompts`` reads
it into ``PromptRecord.label``. Every row gets its own noise seed (no two images share their
initial latent, so classes are not confounded with noise), and each prompt's last seeds go to
the test split so that every class has test images.

``python -m probes.experiments.classify.prompt_sets imagenet --out data/prompts/imagenet_fruit.csv`` and
``python -m probes.experiments.classify.prompt_sets toy --out data/prompts/toy_classes.csv`` made the
shipped sets.
"""
from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("prompt", "seed", "split", "class_index")


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by its first letter, which suits class names)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def class_prompt_rows(prompts: Sequence[tuple[int, str]], seeds_per_prompt: int, test_per_prompt: int,
                      first_seed: int = 0) -> list[dict[str, object]]:
    """Rows for ``(class_index, prompt)`` pairs: each prompt with ``seeds_per_prompt`` consecutive
    seeds (all seeds of the set distinct), its last ``test_per_prompt`` of them in ``test``.

    The rest are ``train``; ``load_prompts`` carves validation out of train (``val_fraction``).
    """
    if not 0 <= test_per_prompt <= seeds_per_prompt or seeds_per_prompt < 1:
        raise ValueError(f"need 1 <= seeds_per_prompt and 0 <= test_per_prompt <= seeds_per_prompt; "
                         f"got {seeds_per_prompt} and {test_per_prompt}")
    rows: list[dict[str, object]] = []
    seed = first_seed
    for index, prompt in prompts:
        if index < 0:
            raise ValueError(f"class index {index} of prompt {prompt!r} is negative")
        for j in range(seeds_per_prompt):
            split = "test" if j >= seeds_per_prompt - test_per_prompt else "train"
            rows.append({"prompt": prompt, "seed": seed, "split": split, "class_index": index})
            seed += 1
    return rows


def write_prompt_csv(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write rows as a prompt CSV that ``data.prompts.source`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def toy_class_prompts() -> list[tuple[int, str]]:
    """One prompt per (shape, colour): ``a red cube``, labelled with the shape's index in
    :data:`~probes.toy.world.SHAPES` (the toy classifier's output order).

    A one-object scene's caption is exactly this (see ``Scene.caption``), so the prompts are in
    the toy model's caption distribution.
    """
    from probes.toy.world import COLOURS, SHAPES

    return [(k, f"{article(colour)} {colour} {shape}") for k, shape in enumerate(SHAPES) for colour in COLOURS]


def main(argv: list[str] | None = None) -> None:
    from probes.experiments.classify.imagenet import FRUIT, imagenet_class_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    im = sub.add_parser("imagenet", help="ImageNet classes with a template")
    im.add_argument("--classes", nargs="+", default=list(FRUIT), help="ImageNet category names or indices")
    im.add_argument("--template", default="a photo of {article} {name}")
    im.add_argument("--seeds", type=int, default=8, help="seeds (images) per class")
    im.add_argument("--test", type=int, default=4, help="of which in the test split")
    im.add_argument("--first_seed", type=int, default=0)
    im.add_argument("--out", type=Path, default=Path("data/prompts/imagenet_fruit.csv"))
    toy = sub.add_parser("toy", help="one-object toy scenes, labelled by shape")
    toy.add_argument("--seeds", type=int, default=4, help="seeds per (shape, colour) prompt")
    toy.add_argument("--test", type=int, default=2, help="of which in the test split")
    toy.add_argument("--first_seed", type=int, default=5000)
    toy.add_argument("--out", type=Path, default=Path("data/prompts/toy_classes.csv"))
    a = p.parse_args(argv)
    if a.kind == "imagenet":
        classes = [int(c) if c.isdigit() else c for c in a.classes]
        prompts = imagenet_class_prompts(classes, a.template)
    else:
        prompts = toy_class_prompts()
    print(write_prompt_csv(a.out, class_prompt_rows(prompts, a.seeds, a.test, a.first_seed)))


if __name__ == "__main__":
    main()
