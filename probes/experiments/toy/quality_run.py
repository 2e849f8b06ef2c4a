"""``diffusion-probes toy-quality``: issue 20's sample-quality bars, measured on fresh generations.

Why a command of its own: ``make demo`` scores the images its stores already hold (256 captions,
about a third with one object), too few for tight intervals. This draws captions of fresh scenes
of the model's world (a scene seed no training set or prompt set uses), keeps the first ``one``
one-object captions and the first ``two`` two-object captions whose two colours differ (the
left/right measure needs colours that tell the objects apart), generates one image each with the
protocol's sampler through the store's own generation path, for the model and for its
permuted-weights control, and scores them with :func:`~.sample_quality.sample_quality`.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from probes.common.files import atomic_write, atomic_write_text
from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.experiments.toy.sample_quality import BARS_NOTE, parse_caption, quality_table, sample_quality
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.prompts.sets import PromptRecord
from probes.toy.world import SHIPPED_WORLD, scene_for, world_config

#: scene seed of the captions: not the model's training scenes (0), the demo's prompts (777), the
#: lens's (13013, 13014) nor the labelers' held-out renders (20231108, 20231109)
QUALITY_SCENE_SEED = 31_415
#: noise seed of caption k is FIRST_NOISE_SEED + k
FIRST_NOISE_SEED = 500_000


def quality_captions(one: int, two: int, scene_seed: int = QUALITY_SCENE_SEED, world: str = SHIPPED_WORLD,
                     max_scenes: int = 100_000) -> list[str]:
    """The first ``one`` one-object captions, then the first ``two`` two-object captions with two
    different colours, of ``scene_for(scene_seed, 0, 1, ..., world=world)``."""
    world_config(world)
    ones: list[str] = []
    twos: list[str] = []
    for i in range(max_scenes):
        if len(ones) >= one and len(twos) >= two:
            break
        caption = scene_for(scene_seed, i, world=world).caption()
        objects = parse_caption(caption) or []
        if len(objects) == 1 and len(ones) < one:
            ones.append(caption)
        elif len(objects) == 2 and objects[0][0] != objects[1][0] and len(twos) < two:
            twos.append(caption)
    if len(ones) < one or len(twos) < two:
        raise ValueError(f"only {len(ones)} one-object and {len(twos)} two-object captions in {max_scenes} scenes; "
                         f"ask for fewer")
    return ones + twos


def generated_images(diffusion: DiffusionSpec, captions: list[str], generation: GenerationSpec,
                     first_seed: int = FIRST_NOISE_SEED, progress: bool = True, desc: str = "generating") -> np.ndarray:
    """uint8 [N, H, W, 3]: one image per caption (noise seed ``first_seed + k``), as a store's generation
    makes them (same sampler, latents and precision path), without capturing activations."""
    pipe = load_pipeline(diffusion)
    records = [PromptRecord(index=k, prompt=c, seed=first_seed + k, split="test") for k, c in enumerate(captions)]
    out: dict[int, np.ndarray] = {}
    for batch in generate(pipe, records, range(len(records)), generation, [], CaptureSpec(), progress=progress, desc=desc):
        out.update(zip(batch.indices, batch.images))
    return np.stack([out[k] for k in range(len(captions))])


def toy_quality(out: Path = Path("outputs/toy_quality"), model: str = "data/toy/model", one: int = 200, two: int = 200,
                permute_seed: int = 0, scene_seed: int = QUALITY_SCENE_SEED, world: str = SHIPPED_WORLD,
                steps: int = 15, guidance_scale: float = 7.5, batch_size: int = 16,
                labelers: Path | None = None) -> dict[str, dict[str, float]]:
    """``diffusion-probes toy-quality``: sample-quality bars of the toy model and its permuted control.

    :param out: folder for ``quality.json``, ``quality.md`` and ``images.npz``.
    :param model: the toy model (a diffusers folder; ``data/...`` resolves against the data folder).
    :param one: one-object captions (shape and colour named).
    :param two: two-object captions with two colours (left/right holds).
    :param permute_seed: the control's permutation seed (every U-Net weight tensor, as ``configs/toy/control_permuted_own_images.yaml``).
    :param scene_seed: the captions' scene seed.
    :param world: the world the captions are drawn from (the model's).
    :param steps: sampler steps (K-LMS).
    :param guidance_scale: classifier-free guidance.
    :param batch_size: images per pipeline call.
    :param labelers: the toy labelers' folder (default: the shipped ones).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captions = quality_captions(one, two, scene_seed, world)
    generation = GenerationSpec(steps=steps, guidance_scale=guidance_scale, scheduler="lms", batch_size=batch_size)
    base = DiffusionSpec(source="hub", model_id=model, local_files_only=True, precision="fp32", tokenizer="default")
    models = {"toy model": base, "permuted weights": replace(base, permute_seed=permute_seed)}
    qualities, seconds, images = {}, {}, {}
    for label, spec in models.items():
        t0 = time.perf_counter()
        images[label] = generated_images(spec, captions, generation, desc=label)
        qualities[label] = sample_quality(images[label], captions, labelers)
        seconds[label] = time.perf_counter() - t0
    md = quality_table(qualities)[0]
    command = (f"diffusion-probes toy-quality --out {out} --model {model} --one {one} --two {two} "
               f"--permute_seed {permute_seed} --scene_seed {scene_seed} --world {world}")
    text = "\n".join([
        "# Sample quality of the toy model and its permuted control", "",
        f"Command: `{command}`", "",
        f"{one} one-object and {two} two-object captions (two colours) of fresh world-{world} scenes "
        f"(scene seed {scene_seed}), one image each (noise seeds {FIRST_NOISE_SEED}..), K-LMS {steps} steps, "
        f"guidance {guidance_scale}; scored by the shipped toy labelers and shape classifier.", "",
        md, "", BARS_NOTE, "",
        "Wall time (s, generation and scoring): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""])
    atomic_write_text(out / "quality.md", text)
    atomic_write_text(out / "quality.json", json.dumps({"command": command, "captions": captions,
                                                        "sample_quality": qualities, "seconds": seconds}, indent=1))
    with atomic_write(out / "images.npz", "wb", encoding=None) as f:
        np.savez_compressed(f, captions=np.array(captions), **{k.replace(" ", "_"): v for k, v in images.items()})
    print(text, flush=True)
    return qualities
