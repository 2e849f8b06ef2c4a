"""Real-image datasets with instance masks for the semantic lens: COCO, Pascal VOC, DAVIS 2017.

Each loader takes the dataset's root folder and yields :class:`~.common.LensItem` dicts; a wrong
root fails with the expected folder layout.
"""
from probes.experiments.lens.datasets.coco import CocoInstances
from probes.experiments.lens.datasets.common import LensItem
from probes.experiments.lens.datasets.davis import DavisSequences
from probes.experiments.lens.datasets.voc import VOC_CLASSES, VocInstances

__all__ = ["CocoInstances", "DavisSequences", "LensItem", "VOC_CLASSES", "VocInstances"]
