"""Counterfactual targets: what the probes are told to read after an edit.

Every target is a label map at the probes' label size (the generated image's size), in the
units the probe was trained on, so the editor can use the probe's own task loss against it:

- binary tasks (foreground): a 0/1 mask, ``label > threshold`` as in training;
- regression tasks (depth): probe z-units, ``(label - mean) / std`` with the export's statistics.

Conditions (one target each, per image):

- ``edit``: the label translated by a shift (dx, dy). The reference draws each of dx, dy from
  [-120, -91] ∪ [90, 119] px at 512 px; here the draw is made at 512 px and scaled to the image
  size, so a 64 px toy image moves by 11-15 px, the same fraction of the frame. Foreground: the
  uncovered area is background (0). Regression: the uncovered area repeats the nearest edge row or
  column (a neutral continuation of the background), and the shifted map is rescaled (min-max) to
  ``value_range`` = [-9, 9] z-units, the reference's range.
- ``noop``: the original label in probe units: the probe is asked to read what it already reads
  (roughly), so the image should barely change; its pixel difference measures the edit's side
  effects.
- ``random``: a target that carries no information about the requested shift, made exactly like
  the edit's target otherwise (same transform, same optimisation): ``other_image`` (default) is
  the label of another randomly paired test image, a real, plausible label from the same
  distribution; ``random_shift`` is the image's own label translated by an independent draw from
  the shift distribution (useful with a single image). Both conditions are scored against the
  *edit's* requested shift, so their success rate is the chance of "moving as requested" under an
  edit of the same strength that did not request it.

Video paths (:func:`offset_path`) are sequences of offsets along a line or a circle.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: the image size the reference's shift range is stated at
REFERENCE_SIZE = 512
#: the reference's shift ranges (inclusive, px at 512 px), for each of dx and dy
SHIFT_RANGES: tuple[tuple[int, int], ...] = ((-120, -91), (90, 119))
RANDOM_KINDS = ("other_image", "random_shift")
PATH_KINDS = ("circle", "line")


def scale_offset(dx: float, dy: float, size: tuple[int, int], reference: int = REFERENCE_SIZE) -> tuple[int, int]:
    """An offset stated in px at ``reference`` px -> whole pixels at ``size`` = (H, W)."""
    h, w = size
    return int(round(dx * w / reference)), int(round(dy * h / reference))


def sample_shift(rng: np.random.Generator, size: tuple[int, int],
                 ranges: Sequence[tuple[int, int]] = SHIFT_RANGES, reference: int = REFERENCE_SIZE) -> tuple[int, int]:
    """Draw (dx, dy): each uniform over the union of the integer ranges at ``reference`` px, then
    scaled to ``size`` = (H, W). Positive dx moves right, positive dy moves down."""
    values = np.concatenate([np.arange(lo, hi + 1) for lo, hi in ranges])
    if values.size == 0:
        raise ValueError(f"shift ranges {list(ranges)} contain no integer; give (low, high) pairs with low <= high")
    dx, dy = (int(v) for v in rng.choice(values, size=2))
    return scale_offset(dx, dy, size, reference)


def translate(x: np.ndarray, dx: int, dy: int, fill: str = "zero") -> np.ndarray:
    """``x`` ([H, W]) moved by ``dx`` columns right and ``dy`` rows down.

    ``fill="zero"``: uncovered pixels are 0 and content pushed out is dropped (masks);
    ``fill="edge"``: uncovered pixels repeat the nearest edge of the moved content (depth maps).
    """
    if fill not in ("zero", "edge"):
        raise ValueError(f"translate fill must be 'zero' or 'edge', got {fill!r}")
    h, w = x.shape[:2]
    sy, sx = np.arange(h) - int(dy), np.arange(w) - int(dx)      # source row / column of each output pixel
    if fill == "edge":
        return x[np.ix_(np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1))]
    out = np.zeros_like(x)
    vy, vx = (sy >= 0) & (sy < h), (sx >= 0) & (sx < w)
    out[np.ix_(vy, vx)] = x[np.ix_(sy[vy], sx[vx])]
    return out


def rescale(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Min-max rescale to ``value_range``; a constant map goes to the range's midpoint."""
    lo, hi = float(value_range[0]), float(value_range[1])
    span = float(x.max() - x.min())
    if span == 0.0:
        return np.full_like(x, (lo + hi) / 2, dtype=np.float32)
    return (lo + (x - x.min()) * (hi - lo) / span).astype(np.float32)


@dataclass(frozen=True)
class TargetMaker:
    """Builds a task's targets from raw labels (labeler units), in probe units.

    :param kind: ``binary`` or ``regression`` (the probe's ``info.kind``).
    :param threshold: binary tasks: a label is positive where ``label > threshold`` (the export's).
    :param target_norm: regression tasks: ``{"mean", "std"}`` of the z-score (the export's).
    :param value_range: regression edits: the shifted map is rescaled to this range in z-units
        (the reference's [-9, 9]); ``None`` z-scores it like the training targets instead.
    """

    kind: str
    threshold: float = 0.0
    target_norm: Mapping[str, float] | None = None
    value_range: tuple[float, float] | None = (-9.0, 9.0)

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "regression"):
            raise ValueError(f"target kind must be 'binary' or 'regression' (a probe's info.kind), got {self.kind!r}")

    @classmethod
    def for_probe(cls, info, value_range: tuple[float, float] | None = (-9.0, 9.0)) -> TargetMaker:
        """The maker matching an exported probe's task (its kind, threshold and normalisation)."""
        return cls(kind=info.kind, threshold=float(info.threshold or 0.0) if info.kind == "binary" else 0.0,
                   target_norm=info.target_norm, value_range=value_range)

    def probe_units(self, label: np.ndarray) -> np.ndarray:
        """A raw label as the probe was trained to read it: 0/1 mask, or z-units."""
        if self.kind == "binary":
            return (label > self.threshold).astype(np.float32)
        norm = self.target_norm or {"mean": 0.0, "std": 1.0}
        return ((label - norm["mean"]) / norm["std"]).astype(np.float32)

    def _counterfactual(self, label: np.ndarray, dx: int, dy: int) -> np.ndarray:
        if self.kind == "binary":
            return translate(self.probe_units(label), dx, dy, fill="zero")
        moved = translate(label.astype(np.float32), dx, dy, fill="edge")
        return rescale(moved, self.value_range) if self.value_range is not None else self.probe_units(moved)

    def edit(self, label: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        """The counterfactual: the label moved by ``shift`` = (dx, dy) px."""
        return self._counterfactual(label, *shift)

    def noop(self, label: np.ndarray) -> np.ndarray:
        """The no-op control: the original label in probe units."""
        return self.probe_units(label)

    def random(self, label: np.ndarray) -> np.ndarray:
        """The random control from ``label`` (another image's label, or this one's: see
        :func:`random_source`), transformed like an edit target but not moved."""
        return self._counterfactual(label, 0, 0)


def random_source(kind: str, index: int, labels: Sequence[np.ndarray], rng: np.random.Generator,
                  size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The label and shift a ``random`` target is built from, for image ``index`` of ``labels``.

    ``other_image``: the label of another image (uniform over the others), unshifted;
    ``random_shift``: this image's label with an independent shift.
    """
    if kind not in RANDOM_KINDS:
        raise ValueError(f"random target must be one of {RANDOM_KINDS}, got {kind!r}")
    if kind == "random_shift":
        return labels[index], sample_shift(rng, size)
    if len(labels) < 2:
        raise ValueError("random target 'other_image' needs at least 2 test images; run more images "
                         "(--images) or use --random_target random_shift")
    other = (index + int(rng.integers(1, len(labels)))) % len(labels)
    return labels[other], (0, 0)


def offset_path(kind: str, frames: int, extent: float, size: tuple[int, int],
                reference: int = REFERENCE_SIZE) -> list[tuple[int, int]]:
    """Offsets (dx, dy) for a moving-object video, ``extent`` stated in px at ``reference`` px.

    ``circle``: a full turn of radius ``extent``, starting on the right, clockwise on screen;
    ``line``: left to right, from -``extent`` to +``extent`` horizontally.
    """
    if kind not in PATH_KINDS:
        raise ValueError(f"video path must be one of {PATH_KINDS}, got {kind!r}")
    if frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got {frames}")
    out = []
    for k in range(frames):
        if kind == "circle":
            a = 2 * math.pi * k / frames
            dx, dy = extent * math.cos(a), extent * math.sin(a)
        else:
            dx, dy = (extent * (-1 + 2 * k / (frames - 1)) if frames > 1 else 0.0), 0.0
        out.append(scale_offset(dx, dy, size, reference))
    return out
