"""The demo report's sample grids: every run that draws its own images shows its first test samples,
captioned; a control's caption says its samples are noise and what its scores then measure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probes.store.activations import ActivationStore


def _store(folder: Path, images_from: str | None = None) -> ActivationStore:
    prompts = [{"prompt": f"a red cube number {i}", "split": "test" if i % 2 else "train", "label": 1 if i < 4 else None}
               for i in range(6)]
    manifest = {"fingerprint": folder.name, "request": {}, "num_samples": 6, "generation": {"height": 8, "width": 8},
                "capture": {"layers": [{"name": "up1.0", "module": "m", "channels": 2, "grid": [2, 2]}],
                            "steps": [0], "halves": ["cond"], "dtype": "float32"}, "prompts": prompts}
    if images_from:
        manifest["images_from"] = images_from
    store = ActivationStore.create(folder / "store", manifest)
    rng = np.random.default_rng(0)
    images = None if images_from else rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    store.write_batch(list(range(6)), images,
                      {"up1.0": rng.normal(size=(6, 1, 1, 4, 2)).astype(np.float32)}, [{}] * 6)
    return store


def test_store_sample_grid_shows_the_first_test_samples(tmp_path):
    from probes.reporting.samples import store_sample_grid, write_sample_grid

    store = _store(tmp_path / "model")
    path = store_sample_grid(store, tmp_path / "grid.png", "model", n=2)
    assert Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="no committed val samples"):
        store_sample_grid(store, tmp_path / "none.png", "model", split="val")
    with pytest.raises(ValueError, match="one caption per image"):
        write_sample_grid([np.zeros((8, 8, 3), np.uint8)], [], tmp_path / "bad.png", "bad")


def test_demo_grids_caption_the_model_and_call_the_control_noise(tmp_path):
    from probes.cli.demo import sample_grids

    _store(tmp_path / "model")
    _store(tmp_path / "control_permuted_own_images")
    _store(tmp_path / "control_random_same_images", images_from=str(tmp_path / "model" / "store"))
    runs = [("model", "model", "m.yaml"), ("control_permuted_own_images", "control_permuted_own_images", "c.yaml"),
            ("control_random_same_images", "control_random_same_images", "r.yaml")]
    md, hs = sample_grids(tmp_path, runs)
    assert (tmp_path / "samples_model.png").exists() and (tmp_path / "samples_control_permuted_own_images.png").exists()
    assert not (tmp_path / "samples_control_random_same_images.png").exists()      # it shows the model's images
    text = "\n".join(md)
    assert "![model samples](samples_model.png)" in text and "these are noise" in text
    assert len(hs) == 2 and all("data:image/png;base64" in h for h in hs)


def test_the_demo_runs_one_control_of_each_kind_and_the_experiment_all_of_them():
    import yaml

    from probes.cli.demo import ALL_RUNS, RUNS
    from probes.paths import REPO_ROOT

    folders = [folder for _, folder, _ in RUNS]
    assert folders[0] == "model" and any("own_images" in f for f in folders) and any("same_images" in f for f in folders)
    experiment = yaml.safe_load((REPO_ROOT / "configs/toy/experiment.yaml").read_text())
    assert [tuple(r) for r in experiment["runs"]] == list(ALL_RUNS)
    assert all((REPO_ROOT / config).exists() for _, _, config in ALL_RUNS)


def test_the_demo_scores_the_classifier_in_the_model_run_not_in_the_same_image_controls():
    """The classifier experiment reads the model's one-object test scenes (no run of its own); a
    same-image control's decoded images are the model's, so its configs leave the classifier out."""
    import yaml

    from probes.cli.compose import config_bases
    from probes.paths import REPO_ROOT

    def classifier(config: str):
        value = "unset"
        for path in config_bases(REPO_ROOT / config):      # bases first, the last that sets it wins
            data = yaml.safe_load(path.read_text()) or {}
            value = data.get("classifier", value)
        return value

    assert classifier("configs/toy/demo.yaml") == "../classifier/toy.yaml"
    assert classifier("configs/toy/control_permuted_own_images.yaml") == "../classifier/toy.yaml"
    from probes.experiments.classify.stage import ClassifierScores

    for control in ("control_permuted_same_images", "control_random_same_images"):
        off = classifier(f"configs/toy/{control}.yaml")      # the class group takes a mapping, never null
        assert off == {"name": None} and ClassifierScores(**off).config is None
    assert "classifier_run" not in yaml.safe_load((REPO_ROOT / "configs/toy/experiment.yaml").read_text())


def test_demo_classifier_section_counts_each_runs_one_object_test_scenes(tmp_path):
    from probes.cli.demo import classifier_section
    from probes.reporting.tables import write_metrics_csv

    for folder, top1 in (("model", 0.9), ("control_permuted_own_images", 0.25), ("control_random_same_images", None)):
        _store(tmp_path / folder)
        rows = [{"split": "test", "task": "foreground", "layer": "up1.0", "step": s, "timestep": 999.0 - s,
                 "metric": "dice", "value": 0.5} for s in (0, 1)]
        if top1 is not None:
            rows += [{"split": "test", "task": "classification", "layer": "classifier_noisy", "step": s,
                      "timestep": 999.0 - s, "metric": m, "value": top1 if m == "top1" else 0.5}
                     for s in (0, 1) for m in ("top1", "top5", "prob")]
        write_metrics_csv(rows, tmp_path / folder / "metrics.csv")
    runs = [(f, f, "x.yaml") for f in ("model", "control_permuted_own_images", "control_random_same_images")]
    text = "\n".join(classifier_section(tmp_path, runs))
    lines = text.splitlines()
    # test scenes 1 and 3 have a class, the same one
    model = [ln for ln in lines if ln.startswith("| model (2 images; most common shape 1.00) | top1 |")]
    assert len(model) == 1 and model[0].count("0.9") == 2, lines
    assert "control_permuted_own_images" in text and "control_random_same_images" not in text
    assert "| step 0 | step 1 |" in text and "Chance top-1 is 0.25" in text
    assert classifier_section(tmp_path, runs[2:]) == []


def test_the_demo_starts_a_same_image_control_after_the_model_and_checks_jobs(tmp_path):
    from probes.cli.demo import ALL_RUNS, demo, replays_model

    assert [replays_model(config) for _, _, config in ALL_RUNS] == [False, False, True, True]
    assert replays_model("configs/toy/demo.yaml", ["--data.replay.weights", "random"])
    with pytest.raises(ValueError, match="jobs must be a whole number >= 1"):
        demo(str(tmp_path / "demo"), jobs=0)
