"""ImageNet-1k class names and prompts built from them.

The names are torchvision's (``VGG16_Weights.IMAGENET1K_V1.meta["categories"]``), which ship
with torchvision, so they are available offline and in the same order as every ImageNet-1k
classifier's output (torchvision's and timm's). :data:`FRUIT` is the replication's kind of
class set: objects a text-to-image model draws unambiguously and VGG-16 knows well.
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from pathlib import Path

from probes.experiments.classify.prompt_sets import article, class_prompt_rows, write_prompt_csv

#: the fruit classes of ImageNet-1k (indices 948-957), spelled as in its metadata
FRUIT: tuple[str, ...] = ("Granny Smith", "strawberry", "orange", "lemon", "fig", "pineapple", "banana",
                          "jackfruit", "custard apple", "pomegranate")


@functools.lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in output order."""
    from torchvision.models import VGG16_Weights

    return tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def class_index(name: str | int) -> int:
    """The output index of an ImageNet class, by exact name (any case) or by index."""
    cats = imagenet_categories()
    if isinstance(name, int):
        if not 0 <= name < len(cats):
            raise ValueError(f"ImageNet class index {name} is not in 0..{len(cats) - 1}")
        return name
    folded = [c.casefold() for c in cats]
    if name.casefold() in folded:
        return folded.index(name.casefold())
    near = difflib.get_close_matches(name, cats, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    raise ValueError(f"{name!r} is not an ImageNet-1k class name{hint} (names: "
                     f"probes.experiments.classify.imagenet.imagenet_categories())")


def imagenet_class_prompts(classes: Sequence[str | int], template: str = "a photo of {article} {name}"
                           ) -> list[tuple[int, str]]:
    """``(class_index, prompt)`` per class; ``template`` may use ``{name}`` and ``{article}``."""
    if "{name}" not in template:
        raise ValueError(f"template {template!r} must contain {{name}}")
    cats = imagenet_categories()
    out = []
    for c in classes:
        i = class_index(c)
        out.append((i, template.format(name=cats[i], article=article(cats[i]))))
    if len({i for i, _ in out}) != len(out):
        raise ValueError(f"classes {list(classes)} name a class twice")
    return out


def imagenet_prompt_set(out: Path = Path("data/prompts/imagenet_fruit.csv"), classes: list[str] = list(FRUIT),  # noqa: B006
                        template: str = "a photo of {article} {name}", seeds: int = 8, test: int = 4,
                        first_seed: int = 0) -> Path:
    """``diffusion-probes class-prompts imagenet``: ImageNet classes with a template.

    :param out: the CSV to write.
    :param classes: ImageNet category names or indices.
    :param template: the prompt, with ``{name}`` and optionally ``{article}``.
    :param seeds: seeds (images) per class.
    :param test: of which in the test split.
    :param first_seed: the first noise seed.
    """
    named = [int(c) if str(c).isdigit() else c for c in classes]
    path = write_prompt_csv(out, class_prompt_rows(imagenet_class_prompts(named, template), seeds, test, first_seed))
    print(path)
    return path
