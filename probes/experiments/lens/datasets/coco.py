"""COCO object instances (``instances_<split>.json``) read through pycocotools.

The annotation file is read and checked here before pycocotools indexes it: a truncated or foreign
file, an annotation of an undefined category or image, a malformed segmentation, or a
``file_name`` leaving the image folder (``../../secret/x.jpg``) is an error naming the file and the
entry, not a traceback from inside pycocotools or a silently wrong mask.

Instances are numbered 1..n per image in annotation-id order. COCO masks may overlap, and one
instance map holds one id per pixel, so masks are painted largest first: a small object lying on a
large one keeps its pixels (an object fully covered by others disappears, and with it its entry in
``classes``). Crowd annotations (``iscrowd=1``) are not instances; their pixels become
:data:`~probes.experiments.lens.pooling.IGNORE_ID` so they are not mistaken for background either.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from probes.common.files import under_root
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
        dataset = read_annotations(self.annotation_file)
        #: each image's file, checked to lie inside the image folder
        self.files = {img["id"]: under_root(self.image_dir, img["file_name"], "COCO file_name", self.annotation_file)
                      for img in dataset["images"]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
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
        image = read_rgb(require(self.files[image_id], "COCO image", LAYOUT))
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


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the file is damaged or not a COCO instances file (download it again, or "
                      f"fix the entry)")


def _check_segmentation(path: Path, ann: dict[str, Any]) -> None:
    """Polygons (lists of >= 3 x,y pairs) or RLE (``counts`` and ``size``), as pycocotools reads them."""
    seg = ann.get("segmentation")
    where = f"annotation {ann.get('id')!r} (image {ann.get('image_id')!r})"
    if isinstance(seg, list):
        ok = bool(seg) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in seg)
        if not ok:
            raise _bad(path, f"{where} has a malformed polygon segmentation (each polygon: a list of >= 3 x,y pairs)")
    elif isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
                and isinstance(seg.get("counts"), (list, str))):
            raise _bad(path, f"{where} has a malformed RLE segmentation (needs 'counts' and 'size': [height, width])")
    else:
        raise _bad(path, f"{where} has no segmentation (a polygon list or an RLE mapping), got {type(seg).__name__}")


def read_annotations(path: Path) -> dict[str, Any]:
    """A COCO instances file, checked (see the module docstring)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise _bad(path, f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): truncated?") from err
    if not isinstance(data, dict):
        raise _bad(path, f"a JSON {type(data).__name__}, where COCO has an object with images, annotations and "
                         f"categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _bad(path, f"'{key}' is missing or not a list")
    try:
        images = {img["id"]: img for img in data["images"]}
        categories = {c["id"] for c in data["categories"]}
        for img in data["images"]:
            if not isinstance(img["file_name"], str) or not all(isinstance(img[k], int) for k in ("height", "width")):
                raise _bad(path, f"image {img['id']!r} needs a file_name and integer height and width")
    except (KeyError, TypeError) as err:
        raise _bad(path, f"an image or category entry lacks {err}") from err
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not all(k in ann for k in ("id", "image_id", "category_id")):
            raise _bad(path, f"annotation {ann!r:.80} lacks id, image_id or category_id")
        if ann["category_id"] not in categories:
            raise _bad(path, f"annotation {ann['id']!r} has category_id {ann['category_id']!r}, which 'categories' "
                             f"does not define (defined: {sorted(categories)[:10]}{'...' if len(categories) > 10 else ''})")
        if ann["image_id"] not in images:
            raise _bad(path, f"annotation {ann['id']!r} is for image_id {ann['image_id']!r}, which 'images' does not list")
        _check_segmentation(path, ann)
    return data
