"""Per-step classifier scores against a hand computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.experiments.classify.metrics import step_scores


def test_step_scores_match_a_hand_computation():
    # 3 images, 2 steps, 6 classes; labels 0, 1, 2.
    probs = np.array([
        # step 0                                  step 1
        [[.50, .10, .10, .10, .10, .10], [.02, .30, .25, .20, .15, .08]],   # label 0: top-1 / top-5 miss
        [[.10, .05, .25, .20, .30, .10], [.10, .60, .10, .10, .05, .05]],   # label 1: miss (rank 6) / top-1
        [[.30, .05, .25, .20, .15, .05], [.20, .10, .15, .05, .40, .10]],   # label 2: rank 2 / rank 3
    ])
    out = step_scores(probs, [0, 1, 2])
    np.testing.assert_allclose(out["top1"], [1 / 3, 1 / 3])
    # step 0: image 0 rank 1, image 1 rank 6 (the only miss), image 2 rank 2 -> 2/3;
    # step 1: image 0 rank 6 (the only miss), image 1 rank 1, image 2 rank 3 -> 2/3
    np.testing.assert_allclose(out["top5"], [2 / 3, 2 / 3])
    np.testing.assert_allclose(out["prob"], [(.50 + .05 + .25) / 3, (.02 + .60 + .15) / 3])
    assert set(out) == {"top1", "top5", "prob"} and all(v.shape == (2,) for v in out.values())


def test_top5_is_top_k_with_k_at_most_the_class_count():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.3, 0.2, 0.1]]])
    out = step_scores(probs, torch.tensor([0, 0]))
    np.testing.assert_allclose(out["top1"], [0.5])
    np.testing.assert_allclose(out["top5"], [1.0])     # k = min(5, 4) = 4: every class is in the top 4


def test_random_scores_agree_with_numpy_ranks():
    rng = np.random.default_rng(0)
    probs = rng.random((40, 5, 12))
    labels = rng.integers(0, 12, 40)
    out = step_scores(probs, labels)
    order = np.argsort(-probs, axis=-1)
    np.testing.assert_allclose(out["top1"], (order[..., 0] == labels[:, None]).mean(0), atol=1e-6)
    np.testing.assert_allclose(out["top5"], (order[..., :5] == labels[:, None, None]).any(-1).mean(0), atol=1e-6)
    np.testing.assert_allclose(out["prob"], probs[np.arange(40), :, labels].mean(0), atol=1e-6)


@pytest.mark.parametrize("probs, labels, match", [
    (np.zeros((2, 3)), [0, 1], "N images, S steps"),
    (np.zeros((2, 1, 3)), [0], r"\[N\]"),
    (np.zeros((2, 1, 3)), [0, 3], "not class indices"),
    (np.zeros((2, 1, 3)), [-1, 0], "not class indices"),
    (np.zeros((0, 1, 3)), [], "no images"),
])
def test_bad_inputs_are_refused(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        step_scores(probs, np.asarray(labels, dtype=np.int64))
