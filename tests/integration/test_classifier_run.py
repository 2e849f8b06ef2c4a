"""The replication's classifier experiment inside the probe run: a classifier on each step's decoded
test image, written as metric rows (task ``classification``); refused early when it cannot run.
It is a stage of the run (a callback), not an argument of the data module."""
from __future__ import annotations

import csv

import pytest

from probes.diffusion.loading import DiffusionSpec
from probes.experiments.classify.stage import ClassifierScores
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec
from probes.training.datamodule import ActivationDataModule

#: random weights (shapes and flow only); the default weights' preprocessing and class names are kept
RANDOM_RESNET = {"name": "torchvision:resnet18", "weights": None, "batch_size": 8}


def class_prompts(path, labelled: bool = True):
    rows = [("a photo of a lemon", 951), ("a photo of an orange", 950), ("a photo of a banana", 954)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "seed", "split", "class_index"])
        for k, (prompt, label) in enumerate(rows * 2):
            split = "test" if k >= 4 else ("val" if k == 3 else "train")
            w.writerow([prompt, k, split, label if labelled else ""])
    return path


def datamodule(tmp_path, prompts, decode="noisy") -> ActivationDataModule:
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny"), prompts=PromptSpec(source=str(prompts)),
        generation=GenerationSpec(steps=3, batch_size=6, decode=decode), capture=CaptureSpec(layers=["mid.0"]),
        labels={"foreground": {"name": "otsu"}}, store_root=str(tmp_path / "stores"), device="cpu", progress=False)


def trainer(*stages):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(stages))


def test_classifier_rows_per_step_on_the_decoded_test_images(tmp_path):
    from probes.training.ridge import RidgeProbeModule

    dm = datamodule(tmp_path, class_prompts(tmp_path / "p.csv"))
    stage = ClassifierScores(**RANDOM_RESNET)
    run = trainer(stage)
    module = RidgeProbeModule()
    run.fit(module, datamodule=dm)
    run.test(module, datamodule=dm, verbose=False)
    rows = stage.result_rows
    assert {(r["split"], r["task"], r["layer"]) for r in rows} == {("test", "classification", "classifier_noisy")}
    assert sorted({r["metric"] for r in rows}) == ["prob", "top1", "top5"]
    assert sorted(r["step"] for r in rows if r["metric"] == "top1") == [0, 1, 2]
    ts = dm.store.manifest["capture"]["timesteps"]
    assert [r["timestep"] for r in rows if r["metric"] == "prob"] == ts
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    # 2 test images: top-1 accuracy is 0, 0.5 or 1; a 1000-class random net gives each class ~1e-3
    assert all(r["value"] in (0.0, 0.5, 1.0) for r in rows if r["metric"] == "top1")
    assert all(r["value"] < 0.05 for r in rows if r["metric"] == "prob")
    assert stage.export_record == {"classifier": {**RANDOM_RESNET, "view": "full"}}   # exported, for evaluate.py


def test_a_classifier_is_refused_before_any_compute_without_decoded_images_or_classes(tmp_path):
    from probes.training.ridge import RidgeProbeModule

    dm = datamodule(tmp_path, class_prompts(tmp_path / "p.csv"), decode="none")
    with pytest.raises(ValueError, match="data.generation.decode is 'none': set data.generation.decode: noisy"):
        trainer(ClassifierScores(**RANDOM_RESNET)).fit(RidgeProbeModule(), datamodule=dm)
    dm = datamodule(tmp_path, class_prompts(tmp_path / "q.csv", labelled=False))
    with pytest.raises(ValueError, match="none of the 2 test prompts has one: use a prompt CSV with a 'class_index'"):
        trainer(ClassifierScores(**RANDOM_RESNET)).fit(RidgeProbeModule(), datamodule=dm)
    assert not (tmp_path / "stores").exists()              # no store, no generation


def test_classifier_config_is_checked_when_parsed(tmp_path, monkeypatch):
    from probes.cli.preflight import check_prerequisites
    from probes.paths import REPO_ROOT

    with pytest.raises(ValueError, match="unknown classifier .torchvision:vgg61.*did you mean .*vgg16"):
        ClassifierScores(name="torchvision:vgg61")
    with pytest.raises(ValueError, match=r"classifier has unknown keys \['weight'\]"):
        ClassifierScores.from_config({"name": "toy", "weight": "x"})
    dm = datamodule(tmp_path, class_prompts(tmp_path / "p.csv"))
    stage = ClassifierScores.from_config(str(REPO_ROOT / "configs/classifier/vgg16.yaml"))
    assert stage.config == {"name": "torchvision:vgg16", "weights": "DEFAULT", "view": "full", "batch_size": 16}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))   # VGG-16's ImageNet weights absent
    missing = [m for m in check_prerequisites(dm, consumers=[stage]) if "(classifier)" in m.what]
    assert len(missing) == 1 and "vgg16" in missing[0].what.lower() and "empty-torch-home" in missing[0].what
