"""Side-effect measures on hand-made images and tokens, checked against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from probes.experiments.intervention.editor import EditRecord
from probes.experiments.intervention.side_effects import (
    TokenGaussian,
    delta_e_map,
    fit_token_gaussians,
    mean_delta_e,
    object_colour_shift,
    pixel_mae,
    probe_losses,
    psnr,
    same_class,
)
from probes.store.activations import ActivationStore


def lab_by_hand(rgb: tuple[int, int, int]) -> np.ndarray:
    """sRGB (D65) -> CIELAB from the textbook formulas, independently of OpenCV."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = m @ lin / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d ** 3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_delta_e_of_a_known_colour_change_is_the_hand_computed_lab_difference():
    red, blue, grey = (205, 45, 40), (45, 80, 210), (128, 128, 128)
    a = np.full((8, 8, 3), grey, np.uint8)
    a[2:6, 2:6] = red
    b = a.copy()
    b[2:6, 2:6] = blue                                           # the object turned blue
    b[0, 0] = (0, 0, 0)                                          # outside the object: not counted
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    want = np.linalg.norm(lab_by_hand(red) - lab_by_hand(blue))
    # OpenCV's float conversion is within 0.5 ΔE of the exact formulas per colour (side_effects docstring),
    # so a difference of two colours is within 1
    assert mean_delta_e(a, b, mask) == pytest.approx(want, abs=1.0)
    assert delta_e_map(a, b)[0, 0] == pytest.approx(lab_by_hand(grey)[0], abs=0.5)    # grey -> black: ΔL only
    assert mean_delta_e(a, a, mask) == 0
    assert math.isnan(mean_delta_e(a, b, np.zeros((8, 8), bool)))
    # the same object moved two pixels right and turned blue: compared under each image's own mask
    moved = np.full((8, 8, 3), grey, np.uint8)
    moved[2:6, 4:8] = blue
    mask_moved = np.zeros((8, 8), bool)
    mask_moved[2:6, 4:8] = True
    assert object_colour_shift(a, mask, moved, mask_moved) == pytest.approx(mean_delta_e(a, b, mask), rel=1e-6)
    assert object_colour_shift(a, mask, a, mask) == 0
    assert math.isnan(object_colour_shift(a, mask, moved, np.zeros((8, 8), bool)))


def test_pure_red_has_the_textbook_lab_values():
    """Also pins the channel order (RGB, not OpenCV's BGR) and L's scale (0..100)."""
    black, red = np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), (255, 0, 0), np.uint8)
    assert delta_e_map(black, red)[0, 0] == pytest.approx(np.linalg.norm([53.24, 80.09, 67.20]), abs=0.02)


def test_psnr_and_mae_of_identical_and_known_images():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert psnr(a, a) == math.inf and pixel_mae(a, a) == 0
    b = np.full((4, 4, 3), 100, np.uint8)
    c = b.copy()
    c[0, 0] = (110, 90, 100)                  # squared errors 100 + 100 + 0 over 48 values
    assert pixel_mae(b, c) == pytest.approx(20 / 48)
    assert psnr(b, c) == pytest.approx(10 * math.log10(255 ** 2 / (200 / 48)))
    with pytest.raises(ValueError, match="uint8"):
        psnr(b, c.astype(np.float32))


def test_same_class_compares_indices_and_multi_label_answers():
    assert same_class(np.array([0, 2, 1]), np.array([0, 1, 1])).tolist() == [True, False, True]
    before = np.array([[1, 0, 0], [0, 1, 1]], bool)
    after = np.array([[1, 0, 0], [0, 1, 0]], bool)
    assert same_class(before, after).tolist() == [True, False]
    with pytest.raises(ValueError, match="one shape"):
        same_class(before, after[:, :2])


def test_mahalanobis_of_the_mean_is_zero_and_of_a_known_offset_is_its_z_score():
    rng = np.random.default_rng(0)
    std = np.array([1.0, 2.0, 4.0])
    x = rng.normal(size=(5000, 3)) * std + [1.0, -2.0, 3.0]
    g = TokenGaussian(3, shrinkage=False).update(x[:2500]).update(x[2500:])
    mean = x.mean(0)
    assert g.distances(mean)[0] == pytest.approx(0, abs=1e-9)
    cov = np.cov(x, rowvar=False)                              # the plain unbiased covariance
    np.testing.assert_allclose(g.covariance(), cov, rtol=1e-9)
    offset = mean + np.array([0, 3 * np.sqrt(cov[1, 1]), 0])
    want = np.sqrt((offset - mean) @ np.linalg.inv(cov) @ (offset - mean))
    assert g.distances(offset)[0] == pytest.approx(want, rel=1e-9)
    assert g.ratio(x[:100], x[:100]) == pytest.approx(1.0)
    assert g.ratio(x[:100] * 3, x[:100]) > 2                   # tokens pushed outwards are further away
    shrunk = TokenGaussian(3).update(x)                        # shrinkage: still 0 at the mean, still invertible
    assert shrunk.distances(mean)[0] == pytest.approx(0, abs=1e-9)
    few = TokenGaussian(8).update(rng.normal(size=(5, 8)))     # fewer tokens than channels: only shrunk works
    assert np.isfinite(few.distances(rng.normal(size=(2, 8)))).all()
    with pytest.raises(ValueError, match="channels \\+ 1"):
        TokenGaussian(8, shrinkage=False).update(rng.normal(size=(5, 8))).distances(np.zeros(8))


def test_token_gaussians_from_a_store(tmp_path):
    manifest = {"fingerprint": "test", "request": {}, "num_samples": 4, "generation": {"height": 8, "width": 8},
                "capture": {"layers": [{"name": "up1.0", "module": "m", "channels": 3, "grid": [2, 2]}],
                            "steps": [0, 3], "halves": ["uncond", "cond"], "dtype": "float32"}, "prompts": []}
    store = ActivationStore.create(tmp_path / "store", manifest)
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(4, 2, 2, 4, 3)).astype(np.float32)          # [N, steps, halves, T, C]
    store.write_batch(list(range(4)), np.zeros((4, 8, 8, 3), np.uint8), {"up1.0": acts}, [{}] * 4)
    g = fit_token_gaussians(store, [(3, "up1.0")], [0, 1, 2], shrinkage=False)[(3, "up1.0")]
    tokens = acts[:3, 1, 1].reshape(-1, 3)
    assert g.n == 12
    np.testing.assert_allclose(g.covariance(), np.cov(tokens, rowvar=False), rtol=1e-5)
    with pytest.raises(ValueError, match="captured steps"):
        fit_token_gaussians(store, [(1, "up1.0")], [0])


def test_probe_losses_average_the_edits_per_image():
    records = [EditRecord(0, "a", [2.0, 4.0], [1.0, 1.0]), EditRecord(1, "a", [4.0, 6.0], [0.0, 2.0])]
    assert probe_losses(records, 1) == (5.0, 1.5)
    assert all(math.isnan(v) for v in probe_losses([], 0))


def test_mahalanobis_matches_scipy_and_the_editor_measure_is_per_image():
    import torch
    from scipy.spatial.distance import cdist

    from probes.experiments.intervention.side_effects import shift_measure

    rng = np.random.default_rng(1)
    g = TokenGaussian(4).update(rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)))
    x = rng.normal(size=(50, 4))
    mean, precision = g.fitted()
    np.testing.assert_allclose(g.distances(x), cdist(x, mean[None], metric="mahalanobis", VI=precision)[:, 0],
                               rtol=1e-10)
    measure = shift_measure({(2, "up1.0"): g})
    before = torch.from_numpy(rng.normal(size=(2, 6, 4)).astype(np.float32))
    after = before.clone()
    after[1] *= 3
    got = measure((2, "up1.0"), before, after)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(g.ratio(after[1].numpy(), before[1].numpy()))
    assert got[1] > 1.5 and measure((3, "up1.0"), before, after) is None
