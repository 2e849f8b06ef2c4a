"""Loaders read tiny fixtures written in the real COCO, Pascal VOC and DAVIS 2017 formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probes.experiments.lens.datasets import VOC_CLASSES, CocoInstances, DavisSequences, VocInstances
from probes.experiments.lens.datasets.common import read_indexed_png
from probes.experiments.lens.pooling import IGNORE_ID

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def _jpg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _palette_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    img.save(path)


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    _jpg(tmp_path / "val2017" / "a.jpg", 20, 30)
    _jpg(tmp_path / "val2017" / "b.jpg", 16, 16, seed=1)
    # crowd RLE on b.jpg, uncompressed column-major counts: the 4 left columns (4 x 16 = 64 px)
    crowd = {"counts": [0, 64, 192], "size": [16, 16]}
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},
                   {"id": 2, "file_name": "b.jpg", "height": 16, "width": 16}],
        "categories": [{"id": 1, "name": "cat", "supercategory": "animal"},
                       {"id": 2, "name": "dog", "supercategory": "animal"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 300.0,
             "bbox": [2, 2, 25, 15], "segmentation": _rect(2, 2, 27, 17)},
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 25.0,
             "bbox": [10, 5, 5, 5], "segmentation": _rect(10, 5, 15, 10)},   # on top of 10
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 36.0,
             "bbox": [8, 8, 6, 6], "segmentation": _rect(8, 8, 14, 14)},
            {"id": 13, "image_id": 2, "category_id": 2, "iscrowd": 1, "area": 64.0,
             "bbox": [0, 0, 4, 16], "segmentation": crowd},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return tmp_path


def test_coco_reads_instances(coco_root):
    data = CocoInstances(coco_root, "val2017")
    assert len(data) == 2
    a, b = list(data)
    assert a["image"].shape == (20, 30, 3) and a["image"].dtype == np.uint8
    assert a["instances"].dtype == np.int32 and a["instances"].shape == (20, 30)
    assert a["id"] == "1" and a["class_names"] == {1: "cat", 2: "dog"}
    assert a["classes"] == {1: 1, 2: 2} and a["annotation_ids"] == {1: 10, 2: 11}
    assert a["instances"][7, 12] == 2                 # the small dog is painted over the cat
    assert a["instances"][15, 20] == 1
    assert a["instances"][0, 0] == 0
    assert b["classes"] == {1: 1}                     # the crowd annotation is no instance...
    assert (b["instances"][:, :4] == IGNORE_ID).all()  # ...and its pixels are void
    assert b["instances"][10, 10] == 1


def test_coco_filters_and_missing_paths(coco_root, tmp_path):
    dogs = CocoInstances(coco_root, "val2017", category_ids=[2])
    assert len(dogs) == 1 and dogs[0]["classes"] == {1: 2}
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        CocoInstances(tmp_path / "nowhere", "val2017")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    objects = np.zeros((12, 16), dtype=np.uint8)
    objects[2:6, 2:7] = 1
    objects[7:11, 9:15] = 2
    objects[6, 2:7] = 255                              # boundary band
    semantic = np.zeros_like(objects)
    semantic[objects == 1] = 15                        # person
    semantic[objects == 2] = 12                        # dog
    semantic[objects == 255] = 255
    for name in ("2007_000001", "2007_000002"):
        _jpg(tmp_path / "JPEGImages" / f"{name}.jpg", 12, 16)
        _palette_png(tmp_path / "SegmentationObject" / f"{name}.png", objects)
        _palette_png(tmp_path / "SegmentationClass" / f"{name}.png", semantic)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    return tmp_path


def test_voc_reads_instances_and_classes(voc_root):
    data = VocInstances(voc_root, "val")
    assert len(data) == 1
    item = data[0]
    assert item["id"] == "2007_000002" and item["image"].shape == (12, 16, 3)
    assert item["classes"] == {1: 15, 2: 12}
    assert item["class_names"][15] == "person" == VOC_CLASSES[15]
    assert (item["instances"][6, 2:7] == IGNORE_ID).all()
    assert item["instances"][3, 3] == 1 and item["instances"][8, 10] == 2
    assert item["instances"][0, 0] == 0
    assert len(VocInstances(voc_root, split=None)) == 2


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="SegmentationObject"):
        VocInstances(tmp_path / "VOC2012")
    with pytest.raises(FileNotFoundError, match="split file"):
        VocInstances(voc_root, "trainaug")
    rgb = voc_root / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(ValueError, match="palette"):
        read_indexed_png(rgb)


@pytest.fixture
def davis_root(tmp_path: Path) -> Path:
    for t in range(3):
        _jpg(tmp_path / "JPEGImages" / "480p" / "bear" / f"{t:05d}.jpg", 10, 12, seed=t)
        ids = np.zeros((10, 12), dtype=np.uint8)
        ids[2:5, t:t + 3] = 1                          # object 1 walks right
        if t < 2:
            ids[6:9, 8:11] = 2                         # object 2 leaves after frame 1
        if t != 1:                                     # frame 1 is not annotated
            _palette_png(tmp_path / "Annotations" / "480p" / "bear" / f"{t:05d}.png", ids)
    (tmp_path / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("bear\n")
    return tmp_path


def test_davis_sequence_in_order(davis_root):
    data = DavisSequences(davis_root, "val")
    assert data.sequences == ["bear"]
    frames = list(data.frames("bear"))
    assert [f["frame"] for f in frames] == [0, 2]      # the unannotated frame 1 is skipped
    assert [f["id"] for f in frames] == ["bear/00000", "bear/00002"]
    assert [sorted(f["classes"]) for f in frames] == [[1, 2], [1]]
    assert frames[0]["classes"] == {1: None, 2: None} and frames[0]["class_names"] is None
    for f in frames:                                   # ids persist and follow the object
        t = f["frame"]
        assert f["instances"][3, t] == 1 and f["instances"][3, t + 3] == 0
        assert f["image"].shape == (10, 12, 3)
    assert len(list(data)) == 2


def test_davis_class_mapping_and_errors(davis_root, tmp_path):
    data = DavisSequences(davis_root, split=None, classes={"bear": {1: 7}},
                          class_names={7: "bear"})
    first = next(iter(data))
    assert first["classes"] == {1: 7, 2: None} and first["class_names"] == {7: "bear"}
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        DavisSequences(tmp_path / "DAVIS")
    with pytest.raises(FileNotFoundError, match="sequence 'owl'"):
        data.frames("owl")
