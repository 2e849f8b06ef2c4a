"""Transforms move image and instance mask together, never blend ids, and fill from outside."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from probes.experiments.lens.pooling import IGNORE_ID
from probes.experiments.lens.transforms import TRANSFORMS, crop, get, hflip, pad, rotate, scale, shift

COLOURS = {0: (10, 20, 30), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (200, 200, 0)}
NON_TRIVIAL = {"rotation": 37.0, "hflip": 1, "vflip": 1, "scale": 0.73, "padding": 0.2,
               "crop": 0.7, "shift": (0.15, -0.2)}


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 37x53 image (odd, non-square) painted with one colour per instance id."""
    mask = np.zeros((37, 53), dtype=np.int32)
    mask[5:20, 8:30] = 1
    mask[22:35, 30:50] = 2
    mask[10:15, 40:45] = 3
    mask[30:36, 2:6] = 4
    image = np.zeros((37, 53, 3), dtype=np.uint8)
    for k, colour in COLOURS.items():
        image[mask == k] = colour
    return image, mask


def _assert_aligned(image: np.ndarray, mask: np.ndarray) -> None:
    assert image.shape[:2] == mask.shape
    for k, colour in COLOURS.items():
        assert (image[mask == k] == colour).all(), f"colour of instance {k} left its mask"
    assert (image[mask == IGNORE_ID] == 0).all()       # fill came in with the ignore id
    assert set(np.unique(mask)) <= set(COLOURS) | {IGNORE_ID}   # no blended ids


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_image_and_mask_stay_aligned(name):
    image, mask = _scene()
    out, out_mask = TRANSFORMS[name](image, mask, NON_TRIVIAL[name],
                                     interpolation=cv2.INTER_NEAREST)
    _assert_aligned(out, out_mask)
    assert not np.array_equal(out_mask, mask)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_whole_sweep_aligned_and_identity_is_identity(name):
    image, mask = _scene()
    transform = TRANSFORMS[name]
    assert transform.identity in transform.sweep
    for strength in transform.sweep:
        _assert_aligned(*transform(image, mask, strength, interpolation=cv2.INTER_NEAREST))
    out, out_mask = transform(image, mask, transform.identity)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_bilinear_image_keeps_the_same_mask():
    image, mask = _scene()
    _, nearest_mask = rotate(image, mask, 37, interpolation=cv2.INTER_NEAREST)
    out, linear_mask = rotate(image, mask, 37)
    np.testing.assert_array_equal(linear_mask, nearest_mask)
    inner = cv2.erode((linear_mask == 1).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert (out[inner] == COLOURS[1]).all()          # away from edges, no blending


def test_geometry_by_hand():
    image, mask = _scene()
    _, m = hflip(image, mask, 1)
    assert m[5, 53 - 1 - 8] == 1 and m[5, 8] == 0
    _, m = shift(image, mask, (0.1, 0.0))             # 5.3 px -> 5 whole pixels to the right
    np.testing.assert_array_equal(m[:, 5:], mask[:, :-5])
    assert (m[:, :5] == IGNORE_ID).all()
    _, m = pad(image, mask, 0.1)                      # 4 rows, 5 columns on each side
    assert m.shape == (37 + 8, 53 + 10)
    np.testing.assert_array_equal(m[4:-4, 5:-5], mask)
    _, m = crop(image, mask, 0.5)                     # centred 18x26 window
    np.testing.assert_array_equal(m, mask[9:27, 13:39])
    _, m = rotate(image, mask, 180)                   # about the centre: a double flip
    np.testing.assert_array_equal(m, mask[::-1, ::-1])
    _, m = scale(image, mask, 0.5)                    # shrinks: borders filled, objects smaller
    assert (m[0] == IGNORE_ID).all() and (m == 1).sum() < (mask == 1).sum()


def test_options_and_errors():
    image, mask = _scene()
    out, m = rotate(image, mask, 45, fill=(1, 2, 3), mask_fill=0)
    assert (m == IGNORE_ID).sum() == 0 and (out[0, 0] == (1, 2, 3)).all()
    with pytest.raises(ValueError, match="valid"):
        get("shear")
    with pytest.raises(ValueError):
        crop(image, mask, 0.0)
    with pytest.raises(ValueError):
        rotate(image, mask[:5], 10)
