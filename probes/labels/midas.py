"""MiDaS v3 DPT-Large relative inverse depth, through transformers' ``DPTForDepthEstimation``.

``Intel/dpt-large`` on the Hugging Face hub holds the MiDaS v3 DPT-Large weights, so transformers can
run them without the MiDaS repository (whose code needs timm 0.6.x). The model is only half of
MiDaS, though: its numbers depend on the reference pre/post-processing, which we re-implement here
from the MiDaS ``dpt_transform`` and run script rather than using ``DPTImageProcessor``, whose
torchvision/PIL bicubic resampling differs from OpenCV's (different kernel, antialiasing and uint8
rounding). The depth labels of the protocol were made with the reference transform.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from probes.common.env import offline
from probes.common.hub import cached_snapshot, download_command, has_any, hub_cache_dir
from probes.labels.base import Labeler, Missing, register_labeler

if TYPE_CHECKING:  # torch is imported lazily so that building a config stays cheap
    import torch

DEFAULT_MODEL_ID = "Intel/dpt-large"
#: MiDaS ``dpt_transform``: target side, multiple, normalisation (DPT uses 0.5/0.5, not ImageNet's)
NET_SIZE = 384
ENSURE_MULTIPLE_OF = 32
MEAN = 0.5
STD = 0.5
_DTYPES = ("float32", "float16")


def _constrain_to_multiple_of(x: float, multiple: int = ENSURE_MULTIPLE_OF) -> int:
    # MiDaS rounds half to even (np.round); Python's round does the same.
    return int(round(x / multiple) * multiple)


def midas_input_size(height: int, width: int, net_size: int = NET_SIZE) -> tuple[int, int]:
    """Network input (height, width) for an image, by MiDaS's ``Resize(..., resize_method="minimal")``.

    "minimal" keeps the aspect ratio and picks whichever of the two scales (to make the height or the
    width ``net_size``) is closer to 1, then rounds both sides to a multiple of 32. For downscaling
    that puts the shorter side at ``net_size``; for square images (all of ours) it is always
    ``net_size`` x ``net_size``.
    """
    scale_h, scale_w = net_size / height, net_size / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h
    return _constrain_to_multiple_of(scale_h * height), _constrain_to_multiple_of(scale_w * width)


def midas_preprocess(images: np.ndarray, net_size: int = NET_SIZE) -> torch.Tensor:
    """uint8 RGB ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> float32 ``[B, 3, h, w]`` network input.

    Same order and precision as MiDaS's ``dpt_transform``: divide by 255 in float64, resize with
    OpenCV bicubic (no clipping, so overshoot beyond [0, 1] is kept as MiDaS keeps it), normalise
    with mean 0.5 / std 0.5, cast to float32 last (MiDaS's ``PrepareForNet``).
    """
    import torch

    images = _check_images(images)
    h, w = midas_input_size(images.shape[1], images.shape[2], net_size)
    out = np.empty((images.shape[0], 3, h, w), dtype=np.float32)
    for i, image in enumerate(images):
        x = image.astype(np.float64) / 255.0
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)  # cv2 takes (width, height)
        x = (x - MEAN) / STD
        out[i] = x.transpose(2, 0, 1)
    return torch.from_numpy(out)


def midas_postprocess(predicted_depth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``[B, h, w]`` network output -> float32 ``[B, H, W]`` at image resolution.

    Bicubic with ``align_corners=False`` as the MiDaS run script does (the protocol's "resized
    bicubic to 512x512"); done in float32 even for a float16 model so the resize adds no rounding.
    """
    import torch.nn.functional as F

    pred = predicted_depth.float().unsqueeze(1)
    pred = F.interpolate(pred, size=tuple(size), mode="bicubic", align_corners=False)
    return pred.squeeze(1).cpu().numpy().astype(np.float32, copy=False)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [B, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255), got dtype {images.dtype}; "
                         "convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]")
    return images


def _hub_cache_dir(cache_dir: str | None) -> str:
    return str(hub_cache_dir(cache_dir))


class MissingWeightsError(RuntimeError):
    """The MiDaS weights are neither in the local cache nor downloadable."""


@register_labeler("midas")
class MidasLabeler(Labeler):
    """Relative inverse depth (bigger = closer) from MiDaS v3 DPT-Large, at image resolution.

    kwargs: ``model_id`` ("Intel/dpt-large"), ``revision`` (None = the hub's main: not pinned by default,
    because no commit of Intel/dpt-large could be verified where this was written; pin one you downloaded), ``cache_dir``
    (None = the HF cache: ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), ``local_files_only`` (False; also
    forced on by ``HF_HUB_OFFLINE=1``), ``dtype`` ("float32" or "float16"), ``batch_size`` (8),
    ``device`` (overrides the device given to :meth:`load`).
    Outputs are not z-scored: the protocol's fixed normalisation belongs to the probe's target. They
    are raw disparities (zero: infinitely far), so aligned depth metrics are fitted in inverse depth.
    """

    version = "1"
    space = "inverse_depth"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype", "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"midas: dtype={dtype!r} is not supported; use one of {_DTYPES}")
        self.batch_size = int(kwargs.get("batch_size", type(self).batch_size))
        if self.batch_size < 1:
            raise ValueError(f"midas: batch_size={self.batch_size} must be >= 1")
        self.model: Any = None
        self.device: str | None = None

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> MidasLabeler:
        """Wrap an already-built ``DPTForDepthEstimation`` (tests: a tiny random-weight one).

        ``model_id`` defaults to ``"<injected>"`` so cached labels of an injected model can never be
        mistaken for those of the real weights (the fingerprint includes ``model_id``).
        """
        kwargs.setdefault("model_id", "<injected>")
        labeler = cls(**kwargs)
        labeler.model = model
        return labeler

    # -- configuration -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return str(self.kwargs.get("model_id", DEFAULT_MODEL_ID))

    def local_files_only(self) -> bool:
        """True when asked to, or when ``HF_HUB_OFFLINE`` is set: offline, a hub lookup only wastes time."""
        return bool(self.kwargs.get("local_files_only", False)) or offline()

    def cache_kwargs(self) -> dict[str, Any]:
        """Weights and precision change the labels; where they are cached and how we batch do not.

        Defaults are filled in so that spelling out a default does not change the fingerprint.
        """
        return {"model_id": self.model_id, "revision": self.kwargs.get("revision"),
                "dtype": self.kwargs.get("dtype", "float32")}

    # -- loading -------------------------------------------------------------------------------
    def prerequisites(self, key: str) -> list[Missing]:
        """The weights in the Hugging Face cache (downloaded on first use unless local_files_only/offline)."""
        if self.model is not None:
            return []
        cache_dir, revision = self.kwargs.get("cache_dir"), self.kwargs.get("revision")
        snap = cached_snapshot(self.model_id, "config.json", cache_dir, revision)
        if snap is not None and has_any(snap, ("model.safetensors", "pytorch_model.bin", "model*.safetensors")):
            return []
        return [Missing(f"MiDaS weights {self.model_id} ({key}): not in the Hugging Face cache {hub_cache_dir(cache_dir)}",
                        download_command(self.model_id, revision, cache_dir),
                        url=None if self.kwargs.get("local_files_only") else f"https://huggingface.co/{self.model_id}")]

    def load(self, device: str = "cpu") -> None:
        import torch

        device = str(self.kwargs.get("device") or device)
        torch_dtype = getattr(torch, self.kwargs.get("dtype", "float32"))
        if self.model is None:
            self.model = self._from_pretrained(torch_dtype)
        self.model = self.model.to(device=device, dtype=torch_dtype).eval()
        self.device = device

    def _from_pretrained(self, torch_dtype: torch.dtype) -> Any:
        from transformers import DPTForDepthEstimation

        cache_dir = self.kwargs.get("cache_dir")
        revision = self.kwargs.get("revision")
        local_only = self.local_files_only()
        try:
            return DPTForDepthEstimation.from_pretrained(
                self.model_id, revision=revision, cache_dir=cache_dir,
                local_files_only=local_only, dtype=torch_dtype)
        except OSError as err:  # transformers reports missing files / no network as OSError
            raise MissingWeightsError(self._missing_weights_message(cache_dir, revision, local_only, err)) from err

    def _missing_weights_message(self, cache_dir: str | None, revision: str | None,
                                 local_only: bool, err: Exception) -> str:
        opts = (f" --revision {revision}" if revision else "") + (f" --cache-dir {cache_dir}" if cache_dir else "")
        why = ("local_files_only=True forbids downloading" if self.kwargs.get("local_files_only")
               else "HF_HUB_OFFLINE is set, which forbids downloading") \
            if local_only else "downloading them failed (no network, or no such repository/revision)"
        return (
            f"midas: could not load the MiDaS v3 DPT-Large weights {self.model_id!r}"
            f"{f' (revision {revision!r})' if revision else ''}: they are not in the Hugging Face cache "
            f"{_hub_cache_dir(cache_dir)!r} (cache_dir={cache_dir!r}, HF_HOME={os.environ.get('HF_HOME')!r}) "
            f"and {why}. Fetch them into that cache (needs network once):\n"
            f"    hf download {self.model_id}{opts}\n"
            f"or copy a populated cache from another machine and point HF_HOME or cache_dir at it. Original error: {err}"
        )

    # -- labelling -----------------------------------------------------------------------------
    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        import torch

        images = _check_images(images)
        if self.device is None:
            self.load(self.kwargs.get("device", "cpu"))
        self._check_square_support(images.shape[1], images.shape[2])
        dtype = next(self.model.parameters()).dtype
        outs = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                x = midas_preprocess(chunk).to(device=self.device, dtype=dtype)
                pred = self.model(pixel_values=x).predicted_depth
                outs.append(midas_postprocess(pred, images.shape[1:3]))
        if not outs:
            return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    def _check_square_support(self, height: int, width: int) -> None:
        """transformers' plain-ViT DPT rebuilds the token grid as a square: fail early and clearly."""
        h, w = midas_input_size(height, width)
        config = getattr(self.model, "config", None)
        plain_vit = config is not None and not getattr(config, "is_hybrid", False) \
            and getattr(config, "backbone_config", None) is None
        if plain_vit and h != w:
            raise ValueError(
                f"midas: {height}x{width} images become a {h}x{w} network input, but transformers' "
                f"ViT DPT ({self.model_id!r}) only handles square inputs; crop or pad the images to square")
