"""The moving-object video: frame count and size of the MP4 and the GIF, and W&B only when active."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from probes.experiments.intervention.video import log_video, render_frames, write_video


def frames(t: int = 5, h: int = 24, w: int = 32) -> np.ndarray:
    x = np.zeros((t, h, w, 3), np.uint8)
    for k in range(t):
        x[k, :, k * 4:k * 4 + 6] = (255, 64, 0)         # a bar moving right
    return x


def test_mp4_and_gif_have_the_expected_frames_and_size(tmp_path):
    paths = write_video(frames(), tmp_path / "video", fps=4, scale=2)
    cap = cv2.VideoCapture(str(paths["mp4"]))
    read = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (48, 64, 3)
        read += 1
    cap.release()
    assert read == 5
    gif = Image.open(paths["gif"])
    assert gif.n_frames == 5 and gif.size == (64, 48) and gif.info["duration"] == 250


def test_render_frames_runs_one_intervention_per_target():
    targets = [np.full((8, 8), k, np.float32) for k in range(3)]
    out = render_frames(lambda t: np.full((8, 8, 3), int(t[0, 0]) * 10, np.uint8), targets, progress=False)
    assert out.shape == (3, 8, 8, 3) and [int(f[0, 0, 0]) for f in out] == [0, 10, 20]


def test_bad_frames_and_no_wandb_run(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(frames().astype(np.float32), tmp_path / "v")
    paths = write_video(frames(2), tmp_path / "v")
    assert log_video(paths, "video") is False or __import__("wandb").run is not None
