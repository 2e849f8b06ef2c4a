"""Salient-object pseudo-labels from TRACER TE-5 (the authors' released DUTS checkpoint).

Reproduces the authors' inference path: resize to 512x512 (cv2 bilinear), ImageNet-normalise,
take the saliency map, resize it back (bilinear) and truncate ``map * 255`` as their saved PNG
masks do. Labels are returned as float values in 0..255, so the foreground rule "label > 0"
(the project's default threshold) is the reference's own binarisation of those masks.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from probes.common.env import offline as offline_env
from probes.common.hashing import sha256_chunks, sha256_file
from probes.labels.base import Labeler, Missing, register_labeler
from probes.labels.tracer_net import TracerTE5

log = logging.getLogger(__name__)

CHECKPOINT_URL = "https://github.com/Karel911/TRACER/releases/download/v1.0/TRACER-Efficient-5.pth"
#: sha256 of the released checkpoint: unknown, because it could not be downloaded where this code was
#: written. Until it is filled in, a downloaded file is NOT verified; its hash is logged for pinning.
CHECKPOINT_SHA256: str | None = None
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_tracer_state_dict(net: TracerTE5, state_dict: Mapping[str, torch.Tensor]) -> TracerTE5:
    """Load strictly, dropping the ``module.`` prefix that ``nn.DataParallel`` adds on save."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    net.load_state_dict(state_dict, strict=True)
    return net


def checkpoint_path(cache_dir: str | os.PathLike | None = None, url: str = CHECKPOINT_URL) -> Path:
    """Where the checkpoint is cached: ``cache_dir`` or ``$TORCH_HOME/hub/checkpoints``, under the URL's file name."""
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / url.rsplit("/", 1)[-1]


def resolve_checkpoint(cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
                       url: str = CHECKPOINT_URL) -> Path:
    """Path of the cached checkpoint, downloading it first unless offline.

    :param cache_dir: folder holding the file; default ``torch.hub.get_dir()/checkpoints``.
    :param offline: never download; default from ``HF_HUB_OFFLINE`` / ``DPROBE_OFFLINE``.
    :return: the path of the checkpoint file.
    """
    target = checkpoint_path(cache_dir, url)
    folder = target.parent
    if target.is_file():
        return target
    offline = offline_env() if offline is None else offline
    how = (f"Download {url} yourself and place it at {target} (or pass checkpoint=<path> to the "
           f"'tracer' labeler).")
    if offline:
        raise FileNotFoundError(f"TRACER checkpoint not found and downloads are disabled (offline). {how}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")  # never leave a half-written target
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, target)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"Could not download the TRACER checkpoint ({err}). {how}") from err
    log.warning("Downloaded the TRACER checkpoint from %s to %s. Its checksum is NOT verified: the project does "
                "not pin it (the released file's sha256 is unknown to it).", url, target)
    return target


@register_labeler("tracer")
class TracerLabeler(Labeler):
    """TRACER TE-5 saliency: float32 ``[B, H, W]`` with integer values 0..255.

    Keyword arguments (all optional): ``checkpoint`` (local file, skips the cache and download),
    ``cache_dir``, ``sha256`` (expected hash of the file; unset -> the file is not verified and its
    computed hash is logged so it can be pinned), ``offline``, ``img_size`` (network input side,
    default 512), ``batch_size``.
    """

    version = "1"
    batch_size = 4

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.img_size = int(kwargs.get("img_size", 512))
        self.batch_size = int(kwargs.get("batch_size", type(self).batch_size))
        self.net: TracerTE5 | None = None
        self.device = torch.device("cpu")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], device: str = "cpu",
                        **kwargs: Any) -> TracerLabeler:
        """A ready labeler with the given weights (bare or ``module.`` keys); nothing is downloaded."""
        labeler = cls(**kwargs)
        net = load_tracer_state_dict(TracerTE5(), state_dict)
        # these weights are not the released checkpoint: give their labels their own cache key
        labeler.kwargs["state_dict_sha256"] = sha256_chunks(
            part for k, v in sorted(net.state_dict().items())
            for part in (k.encode(), v.detach().cpu().contiguous().numpy().tobytes()))
        labeler._setup(net, device)
        return labeler

    def cache_kwargs(self) -> dict[str, Any]:
        # where the file lives and whether we may download it do not change the labels
        return {k: v for k, v in super().cache_kwargs().items() if k not in {"cache_dir", "offline"}}

    def _setup(self, net: TracerTE5, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def prerequisites(self, key: str) -> list[Missing]:
        """The checkpoint: the ``checkpoint`` file, or the cached download (fetched on first use if online)."""
        if self.net is not None:
            return []
        given = self.kwargs.get("checkpoint")
        if given:
            if Path(given).expanduser().is_file():
                return []
            return [Missing(f"TRACER TE-5 checkpoint ({key}.checkpoint): {given} does not exist",
                            f"download {CHECKPOINT_URL} to {given}, or fix {key}.checkpoint")]
        target = checkpoint_path(self.kwargs.get("cache_dir"))
        if target.is_file():
            return []
        return [Missing(f"TRACER TE-5 checkpoint ({key}): not at {target}",
                        f"download {CHECKPOINT_URL} to {target}, or set {key}.checkpoint=<file>",
                        url=None if self.kwargs.get("offline") else CHECKPOINT_URL)]

    def load(self, device: str = "cpu") -> None:
        if self.net is not None:  # weights given already (from_state_dict, or an earlier load)
            self._setup(self.net, device)
            return
        kw = self.kwargs
        path = kw.get("checkpoint") or resolve_checkpoint(kw.get("cache_dir"), kw.get("offline"))
        digest = sha256_file(path)
        expected = kw.get("sha256") or (None if kw.get("checkpoint") else CHECKPOINT_SHA256)  # own files: own hash
        if expected is None:
            log.warning("TRACER checkpoint %s has sha256 %s and is NOT verified (no checksum is pinned for the "
                        "released file); pin it with data.labels.<task>.sha256=%s.", path, digest, digest)
        elif digest.lower() != str(expected).lower():
            raise ValueError(f"TRACER checkpoint {path}: sha256 {digest} does not match the expected {expected}.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._setup(load_tracer_state_dict(TracerTE5(), state), device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, S, S]`` on the model's device."""
        s = self.img_size
        batch = np.stack([img if img.shape[:2] == (s, s)
                          else cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR) for img in images])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("TracerLabeler.load(device) must be called before labelling images.")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
        h, w = images.shape[1:3]
        out = []
        for start in range(0, len(images), self.batch_size):
            sal = self.net(self.preprocess(images[start:start + self.batch_size]))[0]
            sal = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)
            out.append(torch.floor(sal[:, 0] * 255).clamp_(0, 255).cpu())  # == uint8 truncation
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, h, w), np.float32)
