"""The toy world's pseudo-labeler networks and shape classifier: architectures, loading, prediction.

Why: images a diffusion model generates have no ground truth, so the real protocol labels them
with TRACER (foreground), MiDaS (depth) and Intrinsic (shading). In the toy world their stand-ins
are small CNNs trained on renders with exact labels (how: :mod:`probes.recipes.toy_labelers`), so
the probing pipeline runs exactly as it would on Stable Diffusion, and the labelers' own error
is measured on held-out renders instead of assumed.

* One shared :class:`TinyUNet` with three output channels serves the three dense kinds
  (``foreground``, ``depth``, ``shading``): one forward pass labels all three and the three tasks
  share what they learn about object boundaries.
* Depth is predicted as **per-image z-scored inverse depth** (relative, near = large, like
  MiDaS): the absolute scale of a generated image's scene is unknowable, and every score that
  uses it (Spearman, probes on standardised targets) ignores scale and shift anyway.
* Shading is the renderer's grayscale ``ambient + max(0, n . l)``, predicted in absolute units.
* The ``classifier`` (:class:`ShapeClassifier`) says which of :data:`~probes.toy.world.SHAPES`
  are visible (multi-label, one sigmoid each): the toy world's "ImageNet classifier".
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from probes.common.hashing import sha256_file
from probes.paths import data_path
from probes.toy.world import SHAPES

DENSE_KINDS: tuple[str, ...] = ("foreground", "depth", "shading")
KINDS: tuple[str, ...] = DENSE_KINDS + ("classifier",)
WEIGHTS_DIR = data_path("toy", "labelers")
FILES = {"dense": "dense.safetensors", "classifier": "classifier.safetensors"}
SIZE = 64
MIN_VISIBLE_PIXELS = 8      # a shape counts as present when at least this many pixels show it
FIX = "rebuild them with `make toy-model`"


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """A four-level U-Net of plain 3x3 convolutions (~200 k parameters at the default widths).

    Input: RGB in [0, 1], NCHW, side divisible by 8. Output channels: foreground logit,
    z-scored inverse depth, shading.
    """

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48, 64), outputs: int = 3):
        super().__init__()
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        c = 3
        for w in self.widths:
            self.down.append(nn.Sequential(_block(c, w), _block(w, w)))
            c = w
        self.up = nn.ModuleList()
        for w in reversed(self.widths[:-1]):
            self.up.append(nn.Sequential(_block(c + w, w), _block(w, w)))
            c = w
        self.head = nn.Conv2d(c, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - 0.5
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            x = stage(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
        return self.head(x)


class ShapeClassifier(nn.Module):
    """A small strided CNN with average- and max-pooled features; one logit per shape."""

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 96), classes: int = len(SHAPES)):
        super().__init__()
        self.widths = tuple(widths)
        layers, c = [], 3
        for w in self.widths:
            layers += [_block(c, w, stride=2), _block(w, w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x - 0.5)
        return self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


class DenseHead(nn.Module):
    """One kind's map out of the shared U-Net, already in its final units ([N, 1, H, W])."""

    def __init__(self, net: TinyUNet, kind: str):
        super().__init__()
        self.net, self.kind, self.channel = net, kind, DENSE_KINDS.index(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)[:, self.channel: self.channel + 1]
        return torch.sigmoid(y) if self.kind == "foreground" else y


def build(name: str, config: dict | None = None) -> nn.Module:
    """A fresh network from its JSON config, so shipped weights can be rebuilt exactly."""
    config = config or {}
    if name == "dense":
        return TinyUNet(tuple(config.get("widths", (12, 24, 48, 64))))
    if name == "classifier":
        return ShapeClassifier(tuple(config.get("widths", (24, 32, 64, 96))))
    raise ValueError(f"unknown network {name!r}; expected 'dense' or 'classifier'")


def read_manifest(weights_dir: Path) -> dict[str, str]:
    manifest = weights_dir / "MANIFEST.sha256"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing; {FIX}")
    entries = {}
    for line in manifest.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            entries[name.lstrip("*")] = digest
    return entries


@functools.lru_cache(maxsize=8)
def _load_net(name: str, weights_dir: Path) -> nn.Module:
    path = weights_dir / FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"toy labeler weights {path} are missing; {FIX}")
    want = read_manifest(weights_dir).get(path.name)
    if want is None:
        raise ValueError(f"{path.name} is not listed in {weights_dir / 'MANIFEST.sha256'}; {FIX}")
    got = sha256_file(path)
    if got != want:
        raise ValueError(f"{path} has sha256 {got}, but MANIFEST.sha256 says {want}: the file is "
                         f"corrupt or stale; {FIX}")
    config = json.loads(path.with_suffix(".json").read_text())
    # the net is cached for every later caller: its first may be a stage run under Lightning's
    # inference mode, whose tensors a later caller with autograd on (an intervention's loss) cannot use
    with torch.inference_mode(False):
        net = build(name, config)
        net.load_state_dict(load_file(str(path)))
    return net.eval()


def load_toy_net(kind: str, weights_dir: Path | None = None) -> nn.Module:
    """A trained toy labeler in eval mode, refusing weights whose sha256 is not the manifest's.

    Dense kinds give [N, 1, H, W] maps (foreground probability, z-scored inverse depth,
    shading); ``classifier`` gives [N, 4] logits over SHAPES. Inputs are RGB in [0, 1], NCHW.
    Networks are cached per folder and shared between kinds: copy one before changing it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown toy labeler {kind!r}; expected one of {KINDS}")
    root = Path(weights_dir or WEIGHTS_DIR).resolve()
    if kind == "classifier":
        return _load_net("classifier", root)
    return DenseHead(_load_net("dense", root), kind).eval()


def trained_world(weights_dir: Path | None = None) -> str:
    """The world (``v1``, ``v2``) whose renders trained the labelers in ``weights_dir``: checks and
    tests must render that world, since a labeler is only expected to work there. Weights written
    before the recipe named its world are V1's."""
    config = Path(weights_dir or WEIGHTS_DIR) / FILES["dense"]
    config = config.with_suffix(".json")
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing; {FIX}")
    return json.loads(config.read_text()).get("recipe", {}).get("world", "v1")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict(kind: str, images: np.ndarray, weights_dir: Path | None = None,
            batch_size: int = 128) -> np.ndarray:
    """Label uint8 NHWC images: [N, H, W] float32 maps at image resolution, or [N, 4] class
    probabilities. Images of another size are resized to 64 px and the maps resized back,
    because the networks only ever saw 64 px renders."""
    net = load_toy_net(kind, weights_dir)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start: start + batch_size])
        h, w = x.shape[-2:]
        if (h, w) != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        y = net(x)
        if kind == "classifier":
            out.append(torch.sigmoid(y).numpy())
            continue
        if (h, w) != (SIZE, SIZE):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        out.append(y[:, 0].numpy())
    if not out:
        return np.zeros((0, len(SHAPES)) if kind == "classifier" else (0, *images.shape[1:3]),
                        np.float32)
    return np.concatenate(out).astype(np.float32)
