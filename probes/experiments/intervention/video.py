"""The moving-object video: one intervention per frame along a path of targets, written and logged.

Every frame regenerates the same prompt and seed with the target moved one more step along the
path (:func:`probes.experiments.intervention.targets.offset_path`), so the only thing that changes between
frames is where the probes are told the object is. Frames are written as MP4 with OpenCV and as
GIF with Pillow (installed with matplotlib): OpenCV cannot write GIF. When a W&B run is active
the GIF is logged as a ``wandb.Video`` (from the file, so W&B needs no video encoder of its own).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from probes.common.files import atomic_path, atomic_write
from probes.common.progress import progress_bar


def render_frames(intervene: Callable[[np.ndarray], np.ndarray], targets: Sequence[np.ndarray],
                  progress: bool = True) -> np.ndarray:
    """``intervene(target [H, W]) -> image [H, W, 3] uint8`` for each target: frames ``[T, H, W, 3]``."""
    frames = [intervene(t) for t in progress_bar(len(targets), "video frames", "frame", progress, iterable=targets)]
    return np.stack(frames)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement (toy images are 64 px: too small to watch)."""
    if factor < 1:
        raise ValueError(f"video scale must be a whole number >= 1, got {factor}")
    return frames if factor == 1 else frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_mp4(frames: np.ndarray, path: Path, fps: float) -> Path:
    """``frames [T, H, W, 3]`` RGB uint8 -> an MPEG-4 file (OpenCV's ``mp4v`` codec)."""
    t, h, w, _ = frames.shape
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path} with the mp4v codec (this OpenCV build has no video "
                               f"encoder); install opencv-python-headless from PyPI, whose wheels include FFmpeg")
        try:
            for f in frames:
                writer.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
    return path


def write_gif(frames: np.ndarray, path: Path, fps: float) -> Path:
    """``frames [T, H, W, 3]`` RGB uint8 -> an endlessly looping GIF (Pillow)."""
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
    with atomic_write(path, "wb") as f:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                       loop=0)
    return path


def write_video(frames: np.ndarray, stem: Path, fps: float = 8.0, scale: int = 1) -> dict[str, Path]:
    """Write ``<stem>.mp4`` and ``<stem>.gif``; returns their paths by format."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"video frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    frames = upscale(frames, scale)
    stem = Path(stem)
    return {"mp4": write_mp4(frames, stem.with_suffix(".mp4"), fps),
            "gif": write_gif(frames, stem.with_suffix(".gif"), fps)}


def active_wandb_run():
    """The active W&B run, or ``None`` (without importing wandb when nothing imported it)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def log_video(paths: dict[str, Path], key: str) -> bool:
    """Log the video to the active W&B run (if any); returns whether it was logged. The GIF file
    carries its own frame rate."""
    run = active_wandb_run()
    if run is None:
        return False
    import wandb

    run.log({key: wandb.Video(str(paths["gif"]))})
    return True
