"""Per-step classification of decoded images, and the ``python -m probes.experiments.classify`` entry."""
from __future__ import annotations

import numpy as np
import pytest

from probes.cli.main import main
from probes.experiments.classify.models import load_classifier
from probes.experiments.classify.run import classify_steps, score_steps
from probes.toy.world import SHAPES, render_many, scene_for

SEED = 4242


@pytest.fixture(scope="module")
def two_steps() -> tuple[np.ndarray, np.ndarray]:
    """8 one-object renders, two per shape, as step 1; the same images blanked to grey as step 0."""
    pool = 40
    shapes = [SHAPES.index(scene_for(SEED, i, 1).objects[0].shape) for i in range(pool)]
    pick = [i for k in range(len(SHAPES)) for i in [j for j in range(pool) if shapes[j] == k][:2]]
    rgb = render_many(pool, SEED, max_objects=1, fields=("rgb",))["rgb"][pick]
    images = np.stack([np.full_like(rgb, 128), rgb], axis=1)          # [8, 2, 64, 64, 3]
    return images, np.array([shapes[i] for i in pick])


def test_classify_steps_keeps_images_and_steps_apart(two_steps):
    images, labels = two_steps
    clf = load_classifier("toy")
    probs = classify_steps(clf, images)
    assert probs.shape == (8, 2, 4)
    np.testing.assert_allclose(probs[:, 1].numpy(), clf(images[:, 1]).numpy(), rtol=1e-5, atol=1e-6)
    scores = score_steps(clf, images, labels)
    assert scores["top1"][0] == pytest.approx(0.25)   # one grey image: one class for all, 2 of 8 right
    assert scores["top1"][1] == 1.0 and scores["prob"][1] > scores["prob"][0]
    with pytest.raises(ValueError, match="S steps"):
        classify_steps(clf, images[:, 0])


def test_module_entry_prints_one_row_per_step(two_steps, tmp_path, capsys):
    images, labels = two_steps
    np.save(tmp_path / "decoded.npy", images)
    (tmp_path / "labels.txt").write_text(" ".join(map(str, labels)))
    main(["classify", "--images", str(tmp_path / "decoded.npy"), "--labels", str(tmp_path / "labels.txt"), "--classifier", "toy"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["step", "top1", "top5", "prob"] and len(lines) == 3
    assert lines[1].split()[:3] == ["0", "0.250", "1.000"] and lines[2].split()[:2] == ["1", "1.000"]
    np.save(tmp_path / "short.npy", labels[:3])
    with pytest.raises(SystemExit, match="3 labels"):
        main(["classify", "--images", str(tmp_path / "decoded.npy"), "--labels", str(tmp_path / "short.npy"), "--classifier", "toy"])
