"""Grayscale shading from Intrinsic (Careaga & Aksoy 2023, "Intrinsic Image Decomposition via Ordinal
Shading"), paper weights.

Intrinsic is not on PyPI and is licensed for academic use only, so it is never bundled here: this
module only adapts an installed copy. It supports both public APIs of the package: the current one
(``intrinsic.pipeline.load_models`` + ``run_pipeline(..., stage=1)`` -> ``gry_shd``) and the v1 one
the 2023-era replications used (``intrinsic.model_util.load_models`` -> ``inv_shading``). Either way
the network output is *inverse* shading, which we uninvert as the pipeline itself does.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from probes.labels.base import Labeler, Missing, register_labeler

#: the newest commit of compphoto/Intrinsic seen when this was written (2025-04-09); pyproject's
#: ``intrinsic`` extra pins the same archive. Its own dependencies (altered_midas, chrislib) are
#: GitHub branches its setup.py names, so they are not pinned by this.
INTRINSIC_COMMIT = "f70db32ef2d2842cd7a0779590a388154aee26de"
INSTALL_CMD = f"pip install https://github.com/compphoto/Intrinsic/archive/{INTRINSIC_COMMIT}.zip"
#: what ``load_models`` fetches into ``$TORCH_HOME/hub/checkpoints`` for each named release
RELEASES = {
    "paper_weights": ("https://github.com/compphoto/Intrinsic/releases/download/v1.0/", ["final_weights.pt"]),
    "rendered_only": ("https://github.com/compphoto/Intrinsic/releases/download/v1.0/", ["rendered_only_weights.pt"]),
    "v2": ("https://github.com/compphoto/Intrinsic/releases/download/v2.0/", [f"stage_{k}.pt" for k in range(5)]),
    "v2.1": ("https://github.com/compphoto/Intrinsic/releases/download/v2.1/", [f"stage_{k}_v21.pt" for k in range(5)]),
}
LICENCE_NOTE = ("Intrinsic is licensed for academic / non-commercial use only (methods possibly patented); "
                "see LICENSE in https://github.com/compphoto/Intrinsic before using it.")
DEFAULT_WEIGHTS = "paper_weights"


def uninvert(inv: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Inverse shading ``1 / (s + 1)`` in (0, 1] -> linear shading ``s`` in [0, 1/eps - 1].

    Same maths as ``chrislib.general.uninvert``: clipping at ``eps`` keeps a saturated sigmoid
    (inv -> 0) from becoming infinite shading, which would wreck the z-scored regression target.
    """
    inv = np.asarray(inv, dtype=np.float32)
    return (1.0 / np.clip(inv, eps, 1.0) - 1.0).astype(np.float32, copy=False)


class IntrinsicNotInstalledError(ImportError):
    """The ``intrinsic`` package (or one of its GitHub-only dependencies) is not importable."""


def _missing_message(err: ImportError) -> str:
    missing = getattr(err, "name", None) or "intrinsic"
    return (
        f"intrinsic labeler: cannot import {missing!r} ({err}). Intrinsic is not on PyPI; install it with\n"
        f"    {INSTALL_CMD}\n"
        "which also installs its GitHub-only dependencies altered_midas (github.com/CCareaga/MiDaS) and "
        "chrislib (github.com/CCareaga/chrislib), so it needs access to GitHub. Building its networks "
        "also fetches torch.hub code (facebookresearch/WSL-Images, rwightman/gen-efficientnet-pytorch) "
        f"and the weights into $TORCH_HOME/hub unless that cache is pre-populated. {LICENCE_NOTE}"
    )


def import_intrinsic() -> tuple[str, Callable[..., Any], Callable[..., Any]]:
    """Return ``(api, load_models, run_pipeline)`` for whichever Intrinsic API is installed.

    ``api`` is ``"current"`` (``load_models`` lives in ``intrinsic.pipeline``, 2024-09 onwards) or
    ``"v1"`` (``intrinsic.model_util.load_models``, up to 2024-04).
    """
    try:
        importlib.import_module("intrinsic")
        pipeline = importlib.import_module("intrinsic.pipeline")
        if hasattr(pipeline, "load_models"):
            return "current", pipeline.load_models, pipeline.run_pipeline
        model_util = importlib.import_module("intrinsic.model_util")
        return "v1", model_util.load_models, pipeline.run_pipeline
    except ImportError as err:
        raise IntrinsicNotInstalledError(_missing_message(err)) from err


@register_labeler("intrinsic")
class IntrinsicLabeler(Labeler):
    """Linear grayscale shading ``[B, H, W]`` (0 = black, 1 = albedo-coloured; up to 999).

    kwargs:
      ``weights`` ("paper_weights"): Intrinsic release name or checkpoint path(s). The protocol uses
      the 2023 paper weights, which only support the grayscale stage 1 (hence ``stage=1`` always).
      ``resize_conf`` (0.0): Intrinsic's processing-resolution policy. 0.0 is the paper's "R_0"
      optimal-resolution search (longer side = max(found size, original), capped at 1500, rounded up
      to a multiple of 32), so the output can be larger than the image; None processes at the image
      size rounded up to a multiple of 32; an int sets the longer side.
      ``seed`` (0): NumPy seed set before *every* image, because the pipeline's least-squares
      equalisation draws an unseeded ``np.random.randn`` pixel subset; seeding per image makes an
      image's label independent of its batch position. The caller's global NumPy RNG state is
      restored afterwards.
      ``resize_before_uninvert`` (False): the 2024 replication's recipe: when Intrinsic's output is
      not at the image's size, resize the *inverse* shading to it (anti-aliased) and uninvert
      afterwards. Default: uninvert first, then resize the linear shading (bilinear), so that the
      label is an interpolation of shading, not of its reciprocal. Both agree when the processing
      size is the image size.
      ``device`` (overrides the device given to :meth:`load`).
    The pipeline runs one image at a time, so ``batch_size`` only sets how many images a call gets.
    """

    version = "1"
    batch_size = 4

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = int(kwargs.get("batch_size", type(self).batch_size))
        self.api: str | None = None
        self.models: Any = None
        self.device: str | None = None
        self._run_pipeline: Callable[..., Any] | None = None

    @property
    def weights(self) -> Any:
        return self.kwargs.get("weights", DEFAULT_WEIGHTS)

    @property
    def resize_conf(self) -> Any:
        return self.kwargs.get("resize_conf", 0.0)

    @property
    def seed(self) -> int:
        return int(self.kwargs.get("seed", 0))

    @property
    def resize_before_uninvert(self) -> bool:
        value = self.kwargs.get("resize_before_uninvert", False)
        if not isinstance(value, bool):
            raise ValueError(f"intrinsic labeler: resize_before_uninvert must be true or false, got {value!r}")
        return value

    def cache_kwargs(self) -> dict[str, Any]:
        """Defaults filled in, so that spelling out a default keeps the same fingerprint (the
        replication's resize order only enters it when on: existing label caches stay valid)."""
        out = {"weights": self.weights, "resize_conf": self.resize_conf, "seed": self.seed}
        if self.resize_before_uninvert:
            out["resize_before_uninvert"] = True
        return out

    def prerequisites(self, key: str) -> list[Missing]:
        """The ``intrinsic`` package (never installed automatically) and its checkpoint(s)."""
        if self.models is not None:
            return []
        out = []
        for module in ("intrinsic", "altered_midas", "chrislib"):
            if importlib.util.find_spec(module) is None:
                out.append(Missing(f"Intrinsic ({key}): the package {module!r} is not installed",
                                   f"pip install -e '.[intrinsic]'  (or {INSTALL_CMD}; academic/non-commercial licence)"))
                break
        import torch

        folder = Path(torch.hub.get_dir()) / "checkpoints"
        weights = self.weights
        if isinstance(weights, str) and weights in RELEASES:
            base, names = RELEASES[weights]
            absent = [n for n in names if not (folder / n).is_file()]
            if absent:
                out.append(Missing(
                    f"Intrinsic weights {weights!r} ({key}): {', '.join(absent)} not in {folder}",
                    f"download {base}{absent[0]}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                    + f" into {folder}; its networks also build from torch.hub code (facebookresearch/WSL-Images, "
                    f"rwightman/gen-efficientnet-pytorch) that must be in {Path(torch.hub.get_dir())} offline",
                    url=base + absent[0]))
        else:
            paths = [weights] if isinstance(weights, str) else list(weights)
            absent = [str(w) for w in paths if not Path(str(w)).expanduser().is_file()]
            if absent:
                out.append(Missing(f"Intrinsic weights ({key}.weights): {', '.join(absent)} not found",
                                   f"fix {key}.weights, or use a release name: {', '.join(RELEASES)}"))
        return out

    def load(self, device: str = "cpu") -> None:
        device = str(self.kwargs.get("device") or device)
        self.api, load_models, self._run_pipeline = import_intrinsic()
        try:
            if self.api == "current":
                # stage=1: the grayscale networks only (all that paper weights have anyway)
                self.models = load_models(self.weights, stage=1, device=device)
            else:
                self.models = load_models(self.weights, device=device)
        except OSError as err:  # urllib/torch.hub failures: no network and no pre-populated cache
            import torch

            raise RuntimeError(
                f"intrinsic labeler: loading weights {self.weights!r} failed ({err}). Offline, the torch.hub "
                f"cache {torch.hub.get_dir()!r} ($TORCH_HOME/hub) must already hold the Intrinsic checkpoint "
                "(checkpoints/final_weights.pt for paper_weights) and the torch.hub code/weights its networks build from "
                "(facebookresearch/WSL-Images ResNeXt-101, rwightman/gen-efficientnet-pytorch)."
            ) from err
        self.device = device

    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"intrinsic labeler: expected uint8 RGB images [B, H, W, 3], "
                             f"got {images.dtype} {images.shape}")
        if self.device is None:
            self.load(self.kwargs.get("device", "cpu"))
        out = np.empty(images.shape[:3], dtype=np.float32)
        state = np.random.get_state()
        try:
            for i, image in enumerate(images):
                np.random.seed(self.seed)
                out[i] = self._shading(image)
        finally:
            np.random.set_state(state)
        return out

    def _shading(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image -> shading at the image's size.

        The pipeline wants float32 sRGB in [0, 1] (float64 makes its networks fail) and linearises
        it itself. It returns results at its processing size, which ``resize_conf=0.0`` may make
        larger than the image; we uninvert first (the label is linear shading) and then resize with
        bilinear interpolation (cv2 ``INTER_LINEAR``), which, unlike bicubic, cannot overshoot below
        0 or create ringing at shadow edges.
        """
        import torch

        h, w = image.shape[:2]
        img = np.ascontiguousarray(image, dtype=np.float32) / np.float32(255.0)
        with torch.no_grad():
            if self.api == "current":
                result = self._run_pipeline(self.models, img, stage=1, resize_conf=self.resize_conf,
                                            device=self.device)
                inv = result["gry_shd"]
            else:
                result = self._run_pipeline(self.models, img, resize_conf=self.resize_conf, device=self.device)
                inv = result["inv_shading"]
        inv = np.asarray(inv.detach().cpu() if hasattr(inv, "detach") else inv, dtype=np.float32)
        if inv.ndim == 3 and inv.shape[-1] == 1:
            inv = inv[..., 0]
        if inv.ndim != 2:
            raise ValueError(f"intrinsic labeler: expected 2-D inverse shading, got shape {inv.shape}")
        if self.resize_before_uninvert:
            return uninvert(resize_antialiased(inv, (h, w)))
        shading = uninvert(inv)
        if shading.shape != (h, w):
            shading = cv2.resize(shading, (w, h), interpolation=cv2.INTER_LINEAR)
        return shading


def resize_antialiased(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized to ``size`` (h, w) with an anti-aliased bilinear filter (PIL), as the
    replication resized Intrinsic's inverse shading before uninverting it.

    PIL widens the bilinear kernel by the scale factor when shrinking, so every source pixel
    contributes (no aliasing), the same family of filter as skimage's ``anti_aliasing`` resize
    the replication's tools use (their exact kernels differ slightly).
    """
    from PIL import Image

    h, w = size
    x = np.asarray(x, dtype=np.float32)
    if x.shape == (h, w):
        return x
    return np.asarray(Image.fromarray(x, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
