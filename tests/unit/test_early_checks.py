"""Settings that used to fail only after generation and labelling are refused before any compute
(issue 9, item 4): ``data.batch_size <= 0``, no validation split, and a disk budget that leaves
out the label caches."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec
from probes.store.activations import ActivationStore, InsufficientDisk
from probes.training.datamodule import ActivationDataModule
from tests.conftest import REPO


def tiny_dm(tmp, **kw) -> ActivationDataModule:
    prompts = kw.pop("prompts", PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=2, val_fraction=0.3))
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny"), prompts=prompts,
        generation=GenerationSpec(steps=2, batch_size=2), capture=CaptureSpec(layers=["up3.0", "mid.0"]),
        labels={"depth": {"name": "vertical"}, "foreground": {"name": "otsu"}},
        store_root=str(tmp), device="cpu", progress=False, **kw)


@pytest.mark.parametrize("value", [0, -1])
def test_batch_size_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match=rf"data.batch_size must be >= 1, got {value}"):
        tiny_dm(tmp_path, batch_size=value)


def test_num_workers_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="data.num_workers"):
        tiny_dm(tmp_path, num_workers=-2)


def test_no_validation_split_is_refused_before_generation(tmp_path):
    dm = tiny_dm(tmp_path / "stores", prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=2,
                                                        val_fraction=0.0))
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    assert "data.prompts.val_fraction" in str(err.value)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())  # nothing generated


def test_evaluation_needs_no_validation_split(tmp_path):
    """``evaluate.py`` tests exported probes: only fitting needs val."""
    dm = tiny_dm(tmp_path, prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=2, val_fraction=0.0))
    dm.check_splits("test")


Usage = namedtuple("Usage", "total used free")


def test_disk_budget_includes_the_label_caches(tmp_path, monkeypatch):
    # what this configuration writes: measured on a run with plenty of disk
    first = tiny_dm(tmp_path / "a")
    first.setup("fit")
    store = first.store
    store_bytes = ActivationStore.required_bytes(store.manifest)
    label_bytes = sum(c.path.stat().st_size for c in first.label_caches.values())
    assert label_bytes > 0
    # a disk with room for the store but not for its labels: what is written under b/ uses it up
    budget = store_bytes + label_bytes // 2
    real = shutil.disk_usage

    def used() -> int:
        return sum(f.stat().st_blocks * 512 for f in (tmp_path / "b").rglob("*") if f.is_file())

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).used, max(budget - used(), 0)))
    dm = tiny_dm(tmp_path / "b")
    with pytest.raises(InsufficientDisk) as err:
        dm.setup("fit")
    assert "label" in str(err.value)
    stores = list((tmp_path / "b").glob("*")) if (tmp_path / "b").exists() else []
    assert all(not (s / "manifest.json").exists() for s in stores), "refused only after creating the store"


def test_decoded_labels_name_labelled_tasks_and_known_labelers(tmp_path):
    """``data.decoded_labels`` (another labeler for the decoded images) is checked with the labels, before any compute."""
    from probes.common.registry import UnknownName
    from probes.reporting.beyond_position import DECODED_NOTE, decoded_note

    with pytest.raises(ValueError, match=r"data.decoded_labels names tasks \['shading'\] that data.labels does not"):
        tiny_dm(tmp_path, decoded_labels={"shading": {"name": "luminance"}})
    with pytest.raises((UnknownName, KeyError), match="otsuu"):
        tiny_dm(tmp_path, decoded_labels={"foreground": {"name": "otsuu"}})
    with pytest.raises(ValueError, match="data.decoded_labels.depth must be a mapping with a 'name'"):
        tiny_dm(tmp_path, decoded_labels={"depth": "vertical"})
    dm = tiny_dm(tmp_path, decoded_labels={"depth": {"name": "vertical"}})
    assert dm.config()["decoded_labels"] == {"depth": {"name": "vertical"}}
    assert "decoded_labels" not in tiny_dm(tmp_path).config()             # exports made before it stay the same
    assert decoded_note(None, "depth") == DECODED_NOTE                    # the labels' own labeler: 1 by construction
