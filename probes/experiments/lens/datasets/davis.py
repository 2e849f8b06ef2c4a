"""DAVIS 2017 video object segmentation: sequences of frames whose instance ids persist.

Annotation PNGs are palette images whose values are object ids, consistent across the frames of a
sequence, which is what the lens needs to ask whether an object's embedding stays close to itself
from frame to frame. The semi-supervised set has no classes per object, so ``classes`` maps each
id to None unless a mapping ``{sequence: {object_id: class}}`` is given. 255 (void, in some
releases) becomes :data:`~probes.experiments.lens.pooling.IGNORE_ID`. Frames without an annotation file
(e.g. all but the first in test-dev) are skipped.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from probes.common.files import under_root
from probes.experiments.lens.datasets.common import LensItem, read_indexed_png, read_rgb, require
from probes.experiments.lens.pooling import IGNORE_ID

VOID = 255

LAYOUT = """\
<root>/                                  (e.g. DAVIS, from DAVIS-2017-trainval-480p.zip)
  JPEGImages/<resolution>/<sequence>/00000.jpg, 00001.jpg, ...
  Annotations/<resolution>/<sequence>/00000.png, ...   (palette PNG: object ids, 0 = background)
  ImageSets/<year>/<split>.txt                         (one sequence per line; not needed with
                                                        split=None)"""


class DavisSequences:
    """The sequences of a DAVIS split; :meth:`frames` yields one sequence's frames in order and
    iterating the object yields every frame of every sequence."""

    def __init__(self, root: str | Path, split: str | None = "val", resolution: str = "480p",
                 year: str = "2017", classes: Mapping[str, Mapping[int, Any]] | None = None,
                 class_names: Mapping[Any, str] | None = None) -> None:
        self.root = require(Path(root), "DAVIS root", LAYOUT)
        self.images = require(self.root / "JPEGImages" / resolution, "DAVIS frames", LAYOUT)
        self.annotations = require(self.root / "Annotations" / resolution, "DAVIS annotations",
                                   LAYOUT)
        if split is None:
            self.sequences = sorted(p.name for p in self.images.iterdir() if p.is_dir())
        else:
            listing = require(self.root / "ImageSets" / year / f"{split}.txt",
                              f"DAVIS split file for {split!r}", LAYOUT)
            self.sequences = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
            for sequence in self.sequences:   # a name read from a file must stay inside the dataset's folders
                under_root(self.images, sequence, "DAVIS sequence", listing)
        self.classes = classes or {}
        self.class_names = dict(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.sequences)

    def frames(self, sequence: str) -> Iterator[LensItem]:
        """The annotated frames of ``sequence`` in order; ``frame`` is the index among all the
        sequence's frames, so skipped unannotated frames leave gaps rather than renumbering."""
        folder = require(self.images / sequence, f"DAVIS sequence {sequence!r}", LAYOUT)
        return self._frames(folder, sequence)

    def _frames(self, folder: Path, sequence: str) -> Iterator[LensItem]:
        mapping = self.classes.get(sequence, {})
        for position, jpg in enumerate(sorted(folder.glob("*.jpg"))):
            png = self.annotations / sequence / f"{jpg.stem}.png"
            if not png.exists():
                continue
            image = read_rgb(jpg)
            ids = read_indexed_png(png)
            if ids.shape != image.shape[:2]:
                raise ValueError(f"DAVIS {sequence}/{jpg.stem}: frame {image.shape[:2]} and "
                                 f"annotation {ids.shape} differ in size")
            instances = ids.astype(np.int32)
            instances[ids == VOID] = IGNORE_ID
            present = [int(k) for k in np.unique(instances) if k not in (0, IGNORE_ID)]
            yield {"image": image, "instances": instances,
                   "classes": {k: mapping.get(k) for k in present},
                   "class_names": self.class_names, "id": f"{sequence}/{jpg.stem}",
                   "sequence": sequence, "frame": position}

    def __iter__(self) -> Iterator[LensItem]:
        for sequence in self.sequences:
            yield from self.frames(sequence)
