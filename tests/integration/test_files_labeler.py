"""The ``files`` labeler and binary labels (issue 9, item 3): a red mask read through OpenCV's BGR
order gave all-zero labels and a "perfect" Dice of 1.000. Colour masks whose channels differ are
refused unless a channel is chosen explicitly; a binary task whose train labels are all empty or
all full is refused before training."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from probes.bench.planted import planted_datamodule, synthetic_datamodule
from probes.diffusion.layers import LayerInfo
from probes.labels import build_labeler
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule
from tests.integration.test_nonfinite import trainer

SIZE = 8
IMAGES = np.zeros((1, SIZE, SIZE, 3), np.uint8)


def mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[2:6, 1:4] = 255
    return m


def write_rgb(path, rgb: np.ndarray) -> None:
    """Save an RGB(A) array as a PNG the way any image tool does (cv2 wants BGR order)."""
    code = cv2.COLOR_RGBA2BGRA if rgb.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, code))


def red_mask_png(tmp_path):
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0] = mask()
    write_rgb(tmp_path / "000000.png", rgb)


def test_a_red_mask_is_refused_naming_the_file_and_the_fix(tmp_path):
    red_mask_png(tmp_path)
    labeler = build_labeler("files", root=str(tmp_path))
    with pytest.raises(ValueError) as err:
        labeler(IMAGES, np.array([0]))
    msg = str(err.value)
    assert str(tmp_path / "000000.png") in msg and "channel" in msg
    assert "data.labels.<task>.channel" in msg or "channel: red" in msg


@pytest.mark.parametrize("channel, expected", [("red", mask()), ("green", np.zeros((SIZE, SIZE))),
                                               ("max", mask()), ("luma", np.round(0.299 * mask()))])
def test_an_explicit_channel_converts_a_colour_mask(tmp_path, channel, expected):
    red_mask_png(tmp_path)
    out = build_labeler("files", root=str(tmp_path), channel=channel)(IMAGES, np.array([0]))
    np.testing.assert_allclose(out[0], expected, atol=1)


def test_grey_masks_stored_as_rgb_read_as_one_channel(tmp_path):
    write_rgb(tmp_path / "000000.png", np.repeat(mask()[..., None], 3, -1))
    out = build_labeler("files", root=str(tmp_path))(IMAGES, np.array([0]))
    np.testing.assert_array_equal(out[0], mask())


def test_a_mask_in_the_alpha_channel_is_not_read_as_empty(tmp_path):
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 3] = mask()
    write_rgb(tmp_path / "000000.png", rgba)
    with pytest.raises(ValueError, match="alpha"):
        build_labeler("files", root=str(tmp_path))(IMAGES, np.array([0]))
    out = build_labeler("files", root=str(tmp_path), channel="alpha")(IMAGES, np.array([0]))
    np.testing.assert_array_equal(out[0], mask())


def test_unknown_channel_is_refused_at_config_time(tmp_path):
    with pytest.raises(ValueError, match="channel"):
        build_labeler("files", root=str(tmp_path), channel="purple")


def test_the_channel_choice_keys_the_label_cache(tmp_path):
    a = build_labeler("files", root=str(tmp_path)).fingerprint()
    assert build_labeler("files", root=str(tmp_path), channel="red").fingerprint() != a


def test_non_finite_label_files_are_named(tmp_path):
    arr = np.zeros((SIZE, SIZE), np.float32)
    arr[1, 1] = np.nan
    np.save(tmp_path / "000000.npy", arr)
    with pytest.raises(ValueError) as err:
        build_labeler("files", root=str(tmp_path), pattern="{index:06d}.npy")(IMAGES, np.array([0]))
    assert str(tmp_path / "000000.npy") in str(err.value) and "non-finite" in str(err.value)


def constant_foreground(tmp_path, value: float):
    layer = LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=4, grid=(4, 4))
    return synthetic_datamodule(tmp_path, n=12, layers=[layer], steps=1, size=16,
                                acts_fn=lambda rng, l: rng.normal(size=(1, l.tokens, l.channels)),
                                label_fns={"foreground": lambda a, rng: np.full((16, 16), value)})


@pytest.mark.parametrize("value, word", [(0.0, "empty"), (255.0, "full")])
def test_binary_task_with_all_empty_or_all_full_train_labels_is_refused(tmp_path, value, word):
    dm = constant_foreground(tmp_path, value)
    with pytest.raises(ValueError) as err:
        trainer().fit(ProbeModule(), datamodule=dm)
    msg = str(err.value)
    n_train = len(dm.datasets["train"].indices)
    assert word in msg and f"all {n_train} train" in msg and "foreground" in msg and "threshold" in msg


def test_ridge_refuses_all_empty_binary_labels_too(tmp_path):
    dm = constant_foreground(tmp_path, 0.0)
    with pytest.raises(ValueError, match="empty"):
        trainer().fit(RidgeProbeModule(), datamodule=dm)


def test_some_empty_masks_are_fine(tmp_path):
    trainer().fit(ProbeModule(), datamodule=planted_datamodule(tmp_path, n=16))
