"""Prompt sets for the toy world: captions of scenes the renderer would draw.

The toy diffusion model learnt captions of rendered scenes, so prompts for it are captions of
fresh scenes (a seed the training set never used), written as a CSV (``prompt,seed``; the seed
is the diffusion noise seed) that ``data.prompts.source`` reads like any other prompt file.
``python -m probes.toy.prompts --n 256 --out data/prompts/toy.csv`` made the shipped set.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from probes.toy.world import scene_for

#: scene seed of prompt sets; the toy model's training scenes use other seeds
PROMPT_SCENE_SEED = 777
FIRST_NOISE_SEED = 1000


def toy_prompts(n: int, scene_seed: int = PROMPT_SCENE_SEED, first_seed: int = FIRST_NOISE_SEED) -> list[tuple[str, int]]:
    """``n`` (caption, noise seed) pairs, deterministic."""
    return [(scene_for(scene_seed, i).caption(), first_seed + i) for i in range(n)]


def write_prompt_csv(path: Path, n: int, scene_seed: int = PROMPT_SCENE_SEED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "seed"])
        w.writerows(toy_prompts(n, scene_seed))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--scene_seed", type=int, default=PROMPT_SCENE_SEED)
    p.add_argument("--out", type=Path, default=Path("data/prompts/toy.csv"))
    a = p.parse_args(argv)
    print(write_prompt_csv(a.out, a.n, a.scene_seed))


if __name__ == "__main__":
    main()
