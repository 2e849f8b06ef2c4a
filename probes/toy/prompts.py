"""Prompt sets for the toy world: captions of scenes the renderer would draw.

The toy diffusion model learnt captions of rendered scenes, so prompts for it are captions of
fresh scenes (a seed the training set never used), written as a CSV (``prompt,seed``; the seed
is the diffusion noise seed) that ``data.prompts.source`` reads like any other prompt file.
``diffusion-probes toy-prompts --n 256 --out data/prompts/toy.csv`` made the shipped set.
"""
from __future__ import annotations

from pathlib import Path

from probes.common.csv_rows import write_csv
from probes.toy.world import scene_for

#: scene seed of prompt sets; the toy model's training scenes use other seeds
PROMPT_SCENE_SEED = 777
FIRST_NOISE_SEED = 1000


def toy_prompts(n: int, scene_seed: int = PROMPT_SCENE_SEED, first_seed: int = FIRST_NOISE_SEED) -> list[tuple[str, int]]:
    """``n`` (caption, noise seed) pairs, deterministic."""
    return [(scene_for(scene_seed, i).caption(), first_seed + i) for i in range(n)]


def write_prompt_csv(path: Path, n: int, scene_seed: int = PROMPT_SCENE_SEED) -> Path:
    """``n`` captions of fresh scenes as a prompt CSV (``prompt,seed``) that ``data.prompts.source`` reads."""
    return write_csv(({"prompt": p, "seed": s} for p, s in toy_prompts(n, scene_seed)), ("prompt", "seed"), path)


def toy_prompt_set(out: Path = Path("data/prompts/toy.csv"), n: int = 256, scene_seed: int = PROMPT_SCENE_SEED) -> Path:
    """``diffusion-probes toy-prompts``: write ``n`` captions of fresh toy scenes to ``out``.

    :param out: the CSV to write.
    :param n: how many prompts.
    :param scene_seed: the scenes' seed (the toy model's training scenes use other seeds).
    """
    path = write_prompt_csv(out, n, scene_seed)
    print(path)
    return path
