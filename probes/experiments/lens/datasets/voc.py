"""Pascal VOC segmentation (``SegmentationObject`` + ``SegmentationClass`` palette PNGs).

Instance ids come from ``SegmentationObject``; the class of an instance is read from
``SegmentationClass`` at its pixels (the most frequent non-background, non-void value, since the
two annotations agree pixel for pixel in the official data). Value 255 (void / object boundary)
becomes :data:`~probes.experiments.lens.pooling.IGNORE_ID`.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from probes.common.files import under_root
from probes.experiments.lens.datasets.common import LensItem, read_indexed_png, read_rgb, require
from probes.experiments.lens.pooling import IGNORE_ID

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOID = 255

LAYOUT = """\
<root>/                                  (e.g. VOCdevkit/VOC2012)
  JPEGImages/<name>.jpg
  SegmentationObject/<name>.png          (palette PNG: instance ids, 255 = void)
  SegmentationClass/<name>.png           (palette PNG: class ids 1..20, 255 = void)
  ImageSets/Segmentation/<split>.txt     (one <name> per line; not needed with split=None)"""


class VocInstances:
    """VOC images with instance masks; ``split=None`` takes every annotated image."""

    def __init__(self, root: str | Path, split: str | None = "val") -> None:
        self.root = require(Path(root), "VOC root", LAYOUT)
        for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
            require(self.root / folder, f"VOC folder {folder}", LAYOUT)
        if split is None:
            self.names = sorted(p.stem for p in (self.root / "SegmentationObject").glob("*.png"))
        else:
            listing = require(self.root / "ImageSets" / "Segmentation" / f"{split}.txt",
                              f"VOC split file for {split!r}", LAYOUT)
            self.names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            for name in self.names:   # a name read from a file must stay inside the dataset's folders
                under_root(self.root / "JPEGImages", name, "VOC image name", listing)
        self.class_names = dict(enumerate(VOC_CLASSES))

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[LensItem]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> LensItem:
        name = self.names[index]
        image = read_rgb(require(self.root / "JPEGImages" / f"{name}.jpg", "VOC image", LAYOUT))
        objects = read_indexed_png(require(self.root / "SegmentationObject" / f"{name}.png",
                                           "VOC object mask", LAYOUT))
        semantic = read_indexed_png(require(self.root / "SegmentationClass" / f"{name}.png",
                                            "VOC class mask", LAYOUT))
        if objects.shape != semantic.shape or objects.shape != image.shape[:2]:
            raise ValueError(f"VOC {name}: image {image.shape[:2]}, object mask {objects.shape} "
                             f"and class mask {semantic.shape} differ in size")
        instances = objects.astype(np.int32)
        instances[objects == VOID] = IGNORE_ID
        classes = {}
        for k in np.unique(instances):
            if k in (0, IGNORE_ID):
                continue
            values = semantic[(instances == k) & (semantic != 0) & (semantic != VOID)]
            if values.size == 0:             # no class pixel under the object: unusable
                instances[instances == k] = IGNORE_ID
                continue
            classes[int(k)] = int(np.bincount(values).argmax())
        return {"image": image, "instances": instances, "classes": classes,
                "class_names": self.class_names, "id": name}
