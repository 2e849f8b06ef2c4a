"""Class-labelled prompt sets: ``prompt,seed,split,class_index`` CSVs for the classifier experiment.

Why: a classifier on decoded images can only be scored against the class the prompt asked for,
so each row carries that class's index in the classifier's output order; ``load_prompts`` reads
it into ``PromptRecord.label``. Every row gets its own noise seed (no two images share their
initial latent, so classes are not confounded with noise), and each prompt's last seeds go to
the test split so that every class has test images.

``diffusion-probes class-prompts imagenet --out data/prompts/imagenet_fruit.csv`` and
``diffusion-probes class-prompts toy --out data/prompts/toy_classes.csv`` made the shipped sets.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from probes.common.csv_rows import write_csv

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
    return write_csv(rows, COLUMNS, path, ignore_extra=False)


def toy_class_prompts() -> list[tuple[int, str]]:
    """One prompt per (shape, colour): ``a red cube``, labelled with the shape's index in
    :data:`~probes.toy.world.SHAPES` (the toy classifier's output order).

    A one-object scene's caption is exactly this (see ``Scene.caption``), so the prompts are in
    the toy model's caption distribution.
    """
    from probes.toy.world import COLOURS, SHAPES

    return [(k, f"{article(colour)} {colour} {shape}") for k, shape in enumerate(SHAPES) for colour in COLOURS]


def toy_class_prompt_set(out: Path = Path("data/prompts/toy_classes.csv"), seeds: int = 4, test: int = 2,
                         first_seed: int = 5000) -> Path:
    """``diffusion-probes class-prompts toy``: one-object toy scenes, labelled by shape.

    :param out: the CSV to write.
    :param seeds: seeds (images) per (shape, colour) prompt.
    :param test: of which in the test split.
    :param first_seed: the first noise seed.
    """
    path = write_prompt_csv(out, class_prompt_rows(toy_class_prompts(), seeds, test, first_seed))
    print(path)
    return path
