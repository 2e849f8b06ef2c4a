"""Prompt sets for the toy world: captions of scenes the renderer would draw.

The toy diffusion model learnt captions of rendered scenes, so prompts for it are captions of
fresh scenes of the world it was trained on (a seed the training set never used), written as a
CSV (``prompt,seed``; the seed is the diffusion noise seed) that ``data.prompts.source`` reads like
any other prompt file. ``diffusion-probes toy-prompts --n 256 --out data/prompts/toy.csv`` made the
shipped set (world :data:`~probes.toy.world.SHIPPED_WORLD`).

Each row also names its scene (column ``id``, read as the record's ``source_id``: ``world:seed:index``,
:func:`scene_id`), so the exact-label protocol can render the scene a caption describes and label it
exactly, whichever rows a run keeps; the prompt fingerprint reads only prompts and seeds, so adding
the column kept every store's name. A one-object scene's row also carries its shape (column
``class_index``, the index in :data:`~probes.toy.world.SHAPES`, the toy classifier's output order; blank
for scenes of several objects), so a run on these prompts can score the classifier on decoded
images (``classifier: configs/classifier/toy.yaml``) on the same test images as its probes.
"""
from __future__ import annotations

from pathlib import Path

from probes.common.csv_rows import write_csv
from probes.toy.world import SHAPES, SHIPPED_WORLD, WORLDS, Scene, scene_for

#: scene seed of prompt sets; the toy model's training scenes use other seeds
PROMPT_SCENE_SEED = 777
FIRST_NOISE_SEED = 1000


def scene_id(world: str, scene_seed: int, index: int) -> str:
    """The name of scene ``scene_for(scene_seed, index, world=world)`` in a prompt CSV's ``id`` column."""
    return f"{world}:{int(scene_seed)}:{int(index)}"


def scene_of(identity: str) -> Scene:
    """The scene a :func:`scene_id` names; anything else is an error naming the value and the fix."""
    parts = str(identity).split(":")
    if len(parts) != 3 or parts[0] not in WORLDS or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        raise ValueError(f"{identity!r} does not name a toy scene (expected 'world:seed:index' with world one of "
                         f"{', '.join(WORLDS)}, e.g. 'v2:777:12'): make the prompt CSV with `diffusion-probes "
                         f"toy-prompts`, which writes each row's scene in its 'id' column")
    return scene_for(int(parts[1]), int(parts[2]), world=parts[0])


def toy_prompts(n: int, scene_seed: int = PROMPT_SCENE_SEED, first_seed: int = FIRST_NOISE_SEED,
                world: str = SHIPPED_WORLD) -> list[tuple[str, int]]:
    """``n`` (caption, noise seed) pairs of ``world``'s scenes, deterministic."""
    return [(scene_for(scene_seed, i, world=world).caption(), first_seed + i) for i in range(n)]


def scene_class(scene: Scene) -> int | None:
    """The class a classifier should name in the scene's image: its shape's index in
    :data:`~probes.toy.world.SHAPES` when it shows one object; None (no single answer) otherwise."""
    return SHAPES.index(scene.objects[0].shape) if len(scene.objects) == 1 else None


def write_prompt_csv(path: Path, n: int, scene_seed: int = PROMPT_SCENE_SEED, world: str = SHIPPED_WORLD) -> Path:
    """``n`` captions of fresh scenes as a prompt CSV (``prompt,seed,id,class_index``; ``id``: the scene;
    ``class_index``: :func:`scene_class`, blank for several objects) that ``data.prompts.source`` reads."""
    rows = []
    for i, (p, s) in enumerate(toy_prompts(n, scene_seed, world=world)):
        label = scene_class(scene_for(scene_seed, i, world=world))
        rows.append({"prompt": p, "seed": s, "id": scene_id(world, scene_seed, i),
                     "class_index": "" if label is None else label})
    return write_csv(rows, ("prompt", "seed", "id", "class_index"), path)


def toy_prompt_set(out: Path = Path("data/prompts/toy.csv"), n: int = 256, scene_seed: int = PROMPT_SCENE_SEED,
                   world: str = SHIPPED_WORLD) -> Path:
    """``diffusion-probes toy-prompts``: write ``n`` captions of fresh toy scenes to ``out``.

    :param out: the CSV to write.
    :param n: how many prompts.
    :param scene_seed: the scenes' seed (the toy model's training scenes use other seeds).
    :param world: the world the scenes are drawn from: the prompted model's (``v1``, ``v2``).
    """
    path = write_prompt_csv(out, n, scene_seed, world)
    print(path)
    return path
