"""Instance pooling: both rules against hand computations, the vanishing rule, layer combos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.experiments.lens.pooling import (
    IGNORE_ID,
    concat_layers,
    instance_ids,
    instance_weights,
    l2_normalize,
    pool_instances,
    pool_layers,
)


def _features() -> np.ndarray:
    # C=2, h=w=2: channel 0 numbers the cells 0..3, channel 1 is 10x that.
    f0 = np.array([[0.0, 1.0], [2.0, 3.0]])
    return np.stack([f0, 10 * f0])


def test_area_rule_by_hand():
    mask = np.zeros((4, 4), dtype=np.int32)   # feature cells are 2x2 pixels
    mask[0:2, 0:2] = 1                        # all of cell (0,0): weight 1
    mask[0:2, 2] = 1                          # half of cell (0,1): weight 0.5
    mask[3, 3] = 2                            # one pixel of cell (1,1): weight 0.25
    mask[3, 0] = IGNORE_ID                    # void: never an instance
    pooled = pool_instances(_features(), mask, method="area")
    assert pooled.ids.tolist() == [1, 2]
    # instance 1: (1*cell0 + 0.5*cell1) / 1.5 = (0 + 0.5) / 1.5 = 1/3 in channel 0
    np.testing.assert_allclose(pooled.embeddings[0], [1 / 3, 10 / 3])
    # instance 2 sees only cell (1,1)
    np.testing.assert_allclose(pooled.embeddings[1], [3.0, 30.0])


def test_area_rule_non_integer_ratio():
    # 5x5 mask, 2x2 features: cells are 2.5 px wide, so the centre pixel [2,3)x[2,3) is split in
    # four quarters of 0.25 px, one per cell (each cell has area 6.25): equal weights 0.04.
    mask = np.zeros((5, 5), dtype=np.int32)
    mask[2, 2] = 1
    mask[0, 0] = 2                            # corner pixel: only cell (0,0), weight 1/6.25
    ids, weights = instance_weights(mask, (2, 2), "area")
    np.testing.assert_allclose(weights[0], np.full((2, 2), 0.04), atol=1e-7)
    np.testing.assert_allclose(weights[1], [[0.16, 0], [0, 0]], atol=1e-7)
    pooled = pool_instances(_features(), mask)
    np.testing.assert_allclose(pooled.embeddings[0], [1.5, 15.0], rtol=1e-6)   # mean of 0..3
    np.testing.assert_allclose(pooled.embeddings[1], [0.0, 0.0], atol=1e-7)


def test_upsample_rule_by_hand():
    # 1x2 features up-sampled to 1x4 (align_corners=False): pixel 1 samples source x = 0.25,
    # i.e. 0.75*f0 + 0.25*f1 = 0.75*0 + 0.25*4 = 1.0
    feats = np.array([[[0.0, 4.0]]])
    mask = np.array([[0, 1, 0, 2]], dtype=np.int32)
    pooled = pool_instances(feats, mask, method="upsample")
    np.testing.assert_allclose(pooled.embeddings[:, 0], [1.0, 4.0])   # pixel 3 clamps to f1


def test_torch_inputs_of_any_dtype():
    mask = torch.zeros(4, 4, dtype=torch.int64)
    mask[:2, :2] = 1
    feats = torch.from_numpy(_features()).to(torch.bfloat16)
    np.testing.assert_allclose(pool_instances(feats, mask).embeddings, [[0.0, 0.0]])


def test_upsample_rule_equals_naive_upsampling():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 4, 6))
    mask = rng.integers(0, 4, size=(13, 21)).astype(np.int32)
    pooled = pool_instances(torch.from_numpy(feats).float(), mask, method="upsample")
    up = F.interpolate(torch.from_numpy(feats)[None], size=(13, 21), mode="bilinear",
                       align_corners=False)[0].numpy()
    naive = np.stack([up[:, mask == k].mean(axis=1) for k in (1, 2, 3)])
    assert pooled.ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(pooled.embeddings, naive, rtol=1e-5, atol=1e-6)


def test_weights_are_areas_in_cells_under_both_rules():
    mask = np.zeros((8, 8), dtype=np.int32)
    mask[1:6, 2:5] = 7                        # 15 px; a cell of a 2x2 map is 16 px
    for method in ("area", "upsample"):
        _, weights = instance_weights(mask, (2, 2), method)
        assert weights.sum() == pytest.approx(15 / 16)


def test_vanishing_rule_and_missing_ids():
    mask = np.zeros((4, 4), dtype=np.int32)
    mask[0:2, 0:2] = 1
    mask[3, 3] = 2                            # 0.25 cells
    kept = pool_instances(_features(), mask, min_cells=0.2)
    assert kept.ids.tolist() == [1, 2]
    dropped = pool_instances(_features(), mask, min_cells=0.25)   # strictly above is kept
    assert dropped.ids.tolist() == [1]
    aligned = pool_instances(_features(), mask, ids=[2, 5, 1], min_cells=0.25, missing="nan")
    assert aligned.ids.tolist() == [2, 5, 1]
    assert np.isnan(aligned.embeddings[:2]).all()
    np.testing.assert_allclose(aligned.embeddings[2], [0.0, 0.0])
    assert pool_instances(_features(), mask, ids=[5]).ids.tolist() == []


def test_background_and_ignore_are_never_instances():
    mask = np.array([[0, IGNORE_ID], [3, 3]])
    assert instance_ids(mask).tolist() == [3]
    assert instance_ids(torch.tensor(mask)).tolist() == [3]


def test_area_rule_refuses_masks_smaller_than_features():
    with pytest.raises(ValueError, match="upsample"):
        pool_instances(np.zeros((1, 8, 8)), np.ones((4, 4), dtype=np.int32))


def test_concat_layers_normalises_each_layer():
    a = np.array([[3.0, 4.0], [0.0, 0.0]])
    b = np.array([[0.0, 10.0, 0.0], [1.0, 0.0, 0.0]])
    out = concat_layers([a, b])
    np.testing.assert_allclose(out, [[0.6, 0.8, 0, 1, 0], [0, 0, 1, 0, 0]])   # zero row stays 0
    np.testing.assert_allclose(concat_layers([a, b], normalize=False), np.hstack([a, b]))
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(a[:1])), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        concat_layers([a, b[:1]])


def test_pool_layers_keeps_instances_present_in_every_layer():
    mask = np.zeros((8, 8), dtype=np.int32)
    mask[0:4, 0:4] = 1                        # 16 px
    mask[7, 7] = 2                            # 1 px: 1/16 cell at 2x2, 1/4 cell at 4x4
    layers = {"coarse": np.ones((3, 2, 2)), "fine": np.arange(64.0).reshape(4, 4, 4)}
    both = pool_layers(layers, mask, min_cells=0.1)
    assert both.ids.tolist() == [1]           # instance 2 vanishes in the coarse layer
    assert both.embeddings.shape == (1, 3 + 4)
    fine = pool_instances(layers["fine"], mask, min_cells=0.1)
    assert fine.ids.tolist() == [1, 2]
    np.testing.assert_allclose(both.embeddings[0, 3:], l2_normalize(fine.embeddings[:1])[0])
