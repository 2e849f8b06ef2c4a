"""The loss the editor minimises: the probe's own task loss against a fixed counterfactual target.

Why the probe's training loss: the edit should make *this* probe read the target in the sense it
was trained in. Foreground: 2-class cross-entropy of the nearest-upsampled logits against the
target mask at label size; regression (depth): Huber (delta 1) against the target in probe
z-units, both averaged over pixels, one value per image.

The probe's map is constant over each token's block of pixels, so both losses are computed
exactly from per-block statistics of the target (the training code's ``binary_loss`` and
``regression_loss``): per iteration O(tokens) instead of O(pixels), which matters at 128 Adam
iterations x 9-16 layers x several steps on 512 px labels. :func:`pixel_loss` is the literal
pixel-level definition, used when the label size is not a multiple of the token grid (and by the
tests, which check that the two agree).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from probes.export.probeset import LinearProbe
from probes.metrics.exact import block_mean
from probes.training.heads import SortedBlocks, apply_probe, binary_loss, regression_loss


def pixel_loss(probe: LinearProbe, acts: Tensor, target: Tensor, huber_delta: float = 1.0) -> Tensor:
    """The task loss per image on the upsampled map: ``acts [B, T, C]``, ``target [B, H, W]`` -> ``[B]``."""
    maps = probe(acts)                                                   # [B, out, H, W]
    if probe.info.kind == "binary":
        return F.cross_entropy(maps, target.round().long(), reduction="none").mean((1, 2))
    return F.huber_loss(maps[:, 0], target.to(maps.dtype), delta=huber_delta, reduction="none").mean((1, 2))


class ProbeObjective:
    """``objective(acts [B, T, C]) -> [B]``: one probe's task loss against one batch of targets.

    :param probe: the exported probe of the edited (layer, step).
    :param target: ``[B, H, W]`` at the probe's label size, in probe units (0/1 or z-units).
    :param huber_delta: regression tasks' Huber threshold (the protocol's 1).
    """

    def __init__(self, probe: LinearProbe, target: Tensor, huber_delta: float = 1.0) -> None:
        info = probe.info
        if target.ndim != 3 or tuple(target.shape[1:]) != tuple(info.label_size):
            raise ValueError(f"probe {info.key} needs targets [batch, {info.label_size[0]}, {info.label_size[1]}] "
                             f"(its label size), got {tuple(target.shape)}; build targets at the generated image size")
        self.probe, self.kind, self.delta = probe, info.kind, huber_delta
        self.target = target.to(torch.float32)
        grid, (hh, ww) = tuple(info.token_grid), info.label_size
        self.exact = hh % grid[0] == 0 and ww % grid[1] == 0
        if self.exact and self.kind == "binary":
            self._fraction = block_mean(self.target, grid)               # [B, T] share of positive pixels
        elif self.exact:
            self._blocks = SortedBlocks(self.target, grid)

    def __call__(self, acts: Tensor) -> Tensor:
        self.probe._check(acts)
        if not self.exact:
            return pixel_loss(self.probe, acts, self.target, self.delta)
        out = apply_probe(acts, self.probe.weight, self.probe.bias)     # [B, T, out]
        if self.kind == "binary":
            return binary_loss(out.unsqueeze(1), self._fraction)[:, 0]
        return regression_loss(out[..., 0].unsqueeze(1), self.target, tuple(self.probe.info.token_grid),
                               self.delta, self._blocks)[:, 0]
