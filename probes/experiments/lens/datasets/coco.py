"""COCO object instances (``instances_<split>.json``) read through pycocotools.

Instances are numbered 1..n per image in annotation-id order. COCO masks may overlap, and one
instance map holds one id per pixel, so masks are painted largest first: a small object lying on a
large one keeps its pixels (an object fully covered by others disappears, and with it its entry in
``classes``). Crowd annotations (``iscrowd=1``) are not instances; their pixels become
:data:`~probes.experiments.lens.pooling.IGNORE_ID` so they are not mistaken for background either.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from probes.experiments.lens.datasets.common import LensItem, read_rgb, require
from probes.experiments.lens.pooling import IGNORE_ID

LAYOUT = """\
<root>/
  annotations/instances_<split>.json   (e.g. instances_val2017.json)
  <split>/<file_name>.jpg               (e.g. val2017/000000000139.jpg)"""


class CocoInstances:
    """Images of one COCO split with their instance masks; indexable and iterable.

    ``annotation_file`` and ``image_dir`` override the standard layout under ``root``.
    ``category_ids`` keeps only those classes; ``min_area`` (pixels) drops smaller instances;
    images left without instances are skipped (they give the lens nothing to measure).
    """

    def __init__(self, root: str | Path, split: str = "val2017",
                 annotation_file: str | Path | None = None, image_dir: str | Path | None = None,
                 category_ids: Iterable[int] | None = None, min_area: int = 0) -> None:
        root = Path(root)
        self.annotation_file = require(
            Path(annotation_file) if annotation_file else
            root / "annotations" / f"instances_{split}.json", "COCO annotation file", LAYOUT)
        self.image_dir = require(Path(image_dir) if image_dir else root / split,
                                 "COCO image folder", LAYOUT)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(self.annotation_file))
        self.category_ids = set(category_ids) if category_ids is not None else None
        self.min_area = min_area
        self.class_names = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}
        self.image_ids = [i for i in sorted(self.coco.getImgIds()) if self._annotations(i)]

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        return sorted((a for a in anns if not a.get("iscrowd", 0)
                       and (self.category_ids is None or a["category_id"] in self.category_ids)),
                      key=lambda a: a["id"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[LensItem]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> LensItem:
        image_id = self.image_ids[index]
        info = self.coco.loadImgs([image_id])[0]
        image = read_rgb(require(self.image_dir / info["file_name"], "COCO image", LAYOUT))
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"COCO image {info['file_name']} is {image.shape[:2]}, the "
                             f"annotation says {(info['height'], info['width'])}")
        instances = np.zeros(image.shape[:2], dtype=np.int32)
        crowd = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
                 if a.get("iscrowd", 0)]
        for ann in crowd:
            instances[self.coco.annToMask(ann) > 0] = IGNORE_ID
        masks = [(k, ann, self.coco.annToMask(ann) > 0)
                 for k, ann in enumerate(self._annotations(image_id), start=1)]
        masks = [m for m in masks if m[2].sum() >= max(self.min_area, 1)]
        for k, _, binary in sorted(masks, key=lambda m: -int(m[2].sum())):
            instances[binary] = k
        present = set(np.unique(instances).tolist())
        return {
            "image": image,
            "instances": instances,
            "classes": {k: ann["category_id"] for k, ann, _ in masks if k in present},
            "class_names": self.class_names,
            "id": str(image_id),
            "annotation_ids": {k: ann["id"] for k, ann, _ in masks if k in present},
        }
