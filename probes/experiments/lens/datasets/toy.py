"""The toy world (:mod:`probes.toy.world`) as a lens dataset: exact instance masks and classes.

Why: COCO, VOC and DAVIS cannot be downloaded everywhere, and the toy diffusion model was trained
on this world, so the lens gets real numbers offline. Scenes are drawn from the world the shipped
model was trained on (:data:`~probes.toy.world.SHIPPED_WORLD`) unless ``world`` says otherwise. Items have the format of the other loaders
(:mod:`.common`): ``image``, ``instances`` (object ``k`` is ``scene.objects[k - 1]``, ids stable
across the frames of a video), ``classes``, ``class_names`` and ``id``.

Classes are the object's shape by default (4 classes), or its colour, or both (``class_by``).
Objects that show fewer than ``min_pixels`` pixels (hidden behind another one, or at the border)
become :data:`~probes.experiments.lens.pooling.IGNORE_ID`: their few pixels say little about the object and
would make its embedding mostly its neighbours'.

:class:`ToyVideos` renders short "videos": a scene whose camera orbits (``motion="camera"``:
azimuth steps) or whose first object slides sideways (``motion="object"``), one render per frame,
built with :func:`dataclasses.replace` on the frozen scene, so every frame's instance ``k`` is the
same object.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from probes.experiments.lens.datasets.common import LensItem
from probes.experiments.lens.pooling import IGNORE_ID
from probes.toy.world import COLOURS, SHAPES, SHIPPED_WORLD, Scene, render, scene_for, world_config

#: default scene seed of the lens: not the toy model's training seed (0) nor the labelers'
#: held-out evaluation seed, so the lens measures the model on scenes it never saw
LENS_SEED = 13_013
CLASS_BY = ("shape", "colour", "shape_colour")


def class_table(class_by: str) -> dict[int, str]:
    """``{class id: name}`` for a class rule (``shape``, ``colour`` or ``shape_colour``)."""
    if class_by == "shape":
        return dict(enumerate(SHAPES))
    if class_by == "colour":
        return dict(enumerate(COLOURS))
    if class_by == "shape_colour":
        return {i: f"{c} {s}" for i, (s, c) in enumerate((s, c) for s in SHAPES for c in COLOURS)}
    raise ValueError(f"unknown class_by {class_by!r}; choose one of {', '.join(CLASS_BY)}")


def _class_of(shape: str, colour: str, class_by: str) -> int:
    if class_by == "shape":
        return SHAPES.index(shape)
    if class_by == "colour":
        return COLOURS.index(colour)
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def scene_item(scene: Scene, item_id: str, size: int, class_by: str, min_pixels: int) -> LensItem:
    """Render ``scene`` into a lens item (see the module docstring)."""
    r = render(scene, size)
    instances = r.instances.astype(np.int32)
    classes: dict[int, int] = {}
    for k, obj in enumerate(scene.objects, start=1):
        pixels = instances == k
        count = int(pixels.sum())
        if count == 0:
            continue
        if count < min_pixels:
            instances[pixels] = IGNORE_ID
            continue
        classes[k] = _class_of(obj.shape, obj.colour, class_by)
    return {"image": r.rgb, "instances": instances, "classes": classes,
            "class_names": class_table(class_by), "id": item_id}


class ToyWorld:
    """``n`` toy scenes ``scene_for(seed, start .. start + n - 1, world=world)``, rendered on demand.

    :param n: number of images.
    :param seed: scene seed (default :data:`LENS_SEED`).
    :param size: image side in pixels (the toy model's is 64).
    :param class_by: ``shape``, ``colour`` or ``shape_colour``.
    :param min_pixels: objects with fewer visible pixels are ignored (see the module docstring).
    :param max_objects: up to this many objects per scene.
    :param start: index of the first scene.
    :param world: the toy world (``v1``, ``v2``): the probed model's.
    """

    def __init__(self, n: int = 200, seed: int = LENS_SEED, size: int = 64, class_by: str = "shape",
                 min_pixels: int = 16, max_objects: int = 3, start: int = 0, world: str = SHIPPED_WORLD) -> None:
        class_table(class_by)                       # fail early on a bad rule
        world_config(world)
        if n < 1:
            raise ValueError(f"toy dataset size n must be >= 1, got {n}")
        self.n, self.seed, self.size, self.class_by = n, seed, size, class_by
        self.min_pixels, self.max_objects, self.start, self.world = min_pixels, max_objects, start, world
        self.class_names = class_table(class_by)

    def fingerprint(self) -> dict:
        """Everything the items depend on (the cache's dataset identity)."""
        return {"dataset": "toy", "n": self.n, "seed": self.seed, "size": self.size, "class_by": self.class_by,
                "min_pixels": self.min_pixels, "max_objects": self.max_objects, "start": self.start,
                "world": self.world}

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[LensItem]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> LensItem:
        if not 0 <= index < self.n:
            raise IndexError(f"toy item {index} out of range 0..{self.n - 1}")
        i = self.start + index
        scene = scene_for(self.seed, i, self.max_objects, self.world)
        return scene_item(scene, f"toy-{self.seed}-{i}", self.size, self.class_by, self.min_pixels)


MOTIONS = ("camera", "object")


def video_frame(scene: Scene, frame: int, motion: str, step: float) -> Scene:
    """Frame ``frame`` of a video starting at ``scene``: the camera's azimuth turned by
    ``frame x step`` degrees, or the first object moved ``frame x step`` along x (world units)."""
    if motion == "camera":
        return replace(scene, camera=replace(scene.camera, azimuth=scene.camera.azimuth + frame * step))
    if motion == "object":
        first = replace(scene.objects[0], x=scene.objects[0].x + frame * step)
        return replace(scene, objects=(first, *scene.objects[1:]))
    raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")


class ToyVideos:
    """Short toy "videos" with the interface of :class:`~.davis.DavisSequences`.

    :param sequences: number of videos (video ``j`` starts from ``scene_for(seed, j)``).
    :param frames: frames per video.
    :param motion: ``camera`` (orbit) or ``object`` (the first object slides along x).
    :param step: per-frame change: degrees of azimuth (camera) or world units (object; the
        scene is about 3 units wide).
    Other parameters as in :class:`ToyWorld`.
    """

    def __init__(self, sequences: int = 12, frames: int = 8, motion: str = "camera", step: float = 8.0,
                 seed: int = LENS_SEED + 1, size: int = 64, class_by: str = "shape", min_pixels: int = 16,
                 max_objects: int = 3, world: str = SHIPPED_WORLD) -> None:
        if motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
        if sequences < 1 or frames < 2:
            raise ValueError(f"toy videos need >= 1 sequence and >= 2 frames, got {sequences} and {frames}")
        class_table(class_by)
        world_config(world)
        self.world = world
        self.n_sequences, self.n_frames, self.motion, self.step = sequences, frames, motion, step
        self.seed, self.size, self.class_by = seed, size, class_by
        self.min_pixels, self.max_objects = min_pixels, max_objects
        self.sequences = [f"toy-video-{seed}-{j}" for j in range(sequences)]
        self.class_names = class_table(class_by)

    def fingerprint(self) -> dict:
        return {"dataset": "toy_videos", "sequences": self.n_sequences, "frames": self.n_frames,
                "motion": self.motion, "step": self.step, "seed": self.seed, "size": self.size,
                "class_by": self.class_by, "min_pixels": self.min_pixels, "max_objects": self.max_objects,
                "world": self.world}

    def __len__(self) -> int:
        return len(self.sequences)

    def frames(self, sequence: str) -> Iterator[LensItem]:
        """The frames of one sequence, in order."""
        if sequence not in self.sequences:
            raise KeyError(f"unknown toy sequence {sequence!r}; sequences: {self.sequences[0]} .. {self.sequences[-1]}")
        j = self.sequences.index(sequence)
        first = scene_for(self.seed, j, self.max_objects, self.world)
        for f in range(self.n_frames):
            item = scene_item(video_frame(first, f, self.motion, self.step), f"{sequence}/{f:05d}", self.size,
                              self.class_by, self.min_pixels)
            yield {**item, "sequence": sequence, "frame": f}

    def __iter__(self) -> Iterator[LensItem]:
        for sequence in self.sequences:
            yield from self.frames(sequence)
