"""The toy world's pseudo-labelers and shape classifier: networks, loading, prediction, scoring.

Why: images a diffusion model generates have no ground truth, so the real protocol labels them
with TRACER (foreground), MiDaS (depth) and Intrinsic (shading). In the toy world their stand-ins
are small CNNs trained on renders with exact labels (see :mod:`probes.toy.train_labelers` for training), so
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
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import spearmanr
from torch import nn

from probes.toy.world import SHAPES, render_many, scene_for

DENSE_KINDS: tuple[str, ...] = ("foreground", "depth", "shading")
KINDS: tuple[str, ...] = DENSE_KINDS + ("classifier",)
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "data" / "toy" / "labelers"
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


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    got = sha256(path)
    if got != want:
        raise ValueError(f"{path} has sha256 {got}, but MANIFEST.sha256 says {want}: the file is "
                         f"corrupt or stale; {FIX}")
    config = json.loads(path.with_suffix(".json").read_text())
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


def present_classes(classes: np.ndarray) -> np.ndarray:
    """[N, H, W] class maps -> [N, 4] 0/1: which shapes at least MIN_VISIBLE_PIXELS show."""
    counts = np.stack([(classes == k).sum((1, 2)) for k in range(len(SHAPES))], 1)
    return (counts >= MIN_VISIBLE_PIXELS).astype(np.float32)


def dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean masks [N, H, W]; 1 when both are empty."""
    inter = (pred & true).sum((1, 2))
    total = pred.sum((1, 2)) + true.sum((1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def spearman_per_image(pred: np.ndarray, true: np.ndarray,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image Spearman over all pixels (or the pixels of ``mask``; NaN where < 3 pixels)."""
    out = []
    for i, (p, t) in enumerate(zip(pred, true)):
        sel = np.ones(p.shape, bool) if mask is None else mask[i]
        out.append(spearmanr(p[sel], t[sel])[0] if sel.sum() >= 3 else np.nan)
    return np.array(out)


def tie_ceiling(true: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-image Spearman of the truth against itself with ties broken at random.

    Why: a directional light shades the flat ground and the wall uniformly, so half an image's
    true shading is one tied value. Any predictor whose output is not exactly constant there
    breaks the tie, and Spearman then cannot reach 1 even for an almost perfect prediction; this
    is the score of the truth plus an invisible (1e-9) jitter, i.e. the metric's ceiling.
    """
    jitter = np.random.default_rng(seed).normal(0.0, 1e-9, true.shape)
    return spearman_per_image(true.astype(np.float64) + jitter, true)


@dataclass(frozen=True)
class Scores:
    foreground_dice: float
    depth_spearman: float
    shading_spearman: float
    shading_spearman_objects: float     # over foreground pixels only
    depth_spearman_tie_ceiling: float   # see tie_ceiling: what jittered truth itself scores
    shading_spearman_tie_ceiling: float
    classifier_top1_in_caption: float   # the downstream score: is the top class one the caption names?
    classifier_label_accuracy: float    # per (image, shape) decision at 0.5 vs visible shapes
    classifier_exact_match: float       # the whole set of visible shapes right
    n_images: int
    seed: int
    world: str = "v1"
    images: str = "renders"             # what the labelers saw: the renders, or e.g. their VAE reconstructions


EVAL_FIELDS = ("rgb", "foreground", "inv_depth", "shading", "classes")


def score(rgb: np.ndarray, truth: dict[str, np.ndarray], named: np.ndarray,
          weights_dir: Path | None = None, seed: int = -1, world: str = "v1",
          images: str = "renders") -> Scores:
    """Per-image mean scores of the labelers on ``rgb`` against exact labels ``truth`` (the
    renders' ``foreground``, ``inv_depth``, ``shading``, ``classes``); ``named`` [N, 4] marks the
    shapes each caption names. ``rgb`` may differ from the renders (e.g. VAE reconstructions):
    the labels are still the scene's."""
    n = len(rgb)
    fg = predict("foreground", rgb, weights_dir)
    depth = predict("depth", rgb, weights_dir)
    shading = predict("shading", rgb, weights_dir)
    probs = predict("classifier", rgb, weights_dir)
    visible = present_classes(truth["classes"])
    decided = probs >= 0.5
    return Scores(
        foreground_dice=float(dice(fg >= 0.5, truth["foreground"]).mean()),
        depth_spearman=float(np.nanmean(spearman_per_image(depth, truth["inv_depth"]))),
        shading_spearman=float(np.nanmean(spearman_per_image(shading, truth["shading"]))),
        shading_spearman_objects=float(np.nanmean(spearman_per_image(
            shading, truth["shading"], truth["foreground"]))),
        depth_spearman_tie_ceiling=float(np.nanmean(tie_ceiling(truth["inv_depth"]))),
        shading_spearman_tie_ceiling=float(np.nanmean(tie_ceiling(truth["shading"]))),
        classifier_top1_in_caption=float(named[np.arange(n), probs.argmax(1)].mean()),
        classifier_label_accuracy=float((decided == visible.astype(bool)).mean()),
        classifier_exact_match=float((decided == visible.astype(bool)).all(1).mean()),
        n_images=n, seed=seed, world=world, images=images)


def named_shapes(seed: int, n: int, world: str = "v1") -> np.ndarray:
    """[n, 4] 0/1: the shapes the caption of ``scene_for(seed, i, world=world)`` names."""
    named = np.zeros((n, len(SHAPES)), np.float32)
    for i in range(n):
        for obj in scene_for(seed, i, world=world).objects:
            named[i, SHAPES.index(obj.shape)] = 1.0
    return named


def evaluate(weights_dir: Path | None = None, n: int = 512, seed: int = 20_231_108,
             world: str = "v1", transform=None, images: str = "renders") -> Scores:
    """Score the labelers on renders they never saw (``seed`` differs from training's).

    ``transform`` (uint8 NHWC -> uint8 NHWC, e.g. a VAE round trip) changes what the labelers see
    while the labels stay the scenes' exact ones; ``images`` names it in the scores.
    """
    data = render_many(n, seed, fields=EVAL_FIELDS, world=world)
    rgb = data["rgb"] if transform is None else transform(data["rgb"])
    return score(rgb, data, named_shapes(seed, n, world), weights_dir, seed, world, images)


if __name__ == "__main__":
    from probes.toy.train_labelers import main

    main()
