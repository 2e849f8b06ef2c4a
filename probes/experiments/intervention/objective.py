"""The loss the editor minimises: the probe's own task loss against a fixed counterfactual target.

Why the probe's training loss: the edit should make *this* probe read the target in the sense it
was trained in. Foreground: 2-class cross-entropy of the nearest-upsampled logits against the
target mask at label size for probes fitted with it (SGD, the reference); squared error of the
logit difference against ±1 for probes fitted by least squares (ridge, mean difference: the
export records which). Cross-entropy has no finite minimum, so on a least-squares probe, whose
logits are small, it keeps pushing the activation far past what the probe calls "foreground"
(measured on the toy model: the image's colours go before its layout does); the squared loss
stops where the probe's training put the classes. Regression (depth): Huber (delta 1) against the
target in probe z-units. All are averaged over pixels, one value per image.

The probe's map is constant over each token's block of pixels, so both losses are computed
exactly from per-block statistics of the target (the training code's ``binary_loss`` and
``regression_loss``): per iteration O(tokens) instead of O(pixels), which matters at 128 Adam
iterations x 9-16 layers x several steps on 512 px labels. :func:`pixel_loss` is the literal
pixel-level definition, used when the label size is not a multiple of the token grid (and by the
tests, which check that the two agree).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from probes.export.probeset import LinearProbe
from probes.metrics.exact import block_mean
from probes.training.heads import SortedBlocks, apply_probe, binary_loss, regression_loss

BINARY_LOSSES = ("cross_entropy", "squared")


def pixel_loss(probe: LinearProbe, acts: Tensor, target: Tensor, huber_delta: float = 1.0,
               binary_loss: str = "cross_entropy") -> Tensor:
    """The task loss per image on the upsampled map: ``acts [B, T, C]``, ``target [B, H, W]`` -> ``[B]``."""
    maps = probe(acts)                                                   # [B, out, H, W]
    if probe.info.kind == "binary" and binary_loss == "squared":
        return ((maps[:, 1] - maps[:, 0]) - (2 * target.round() - 1)).square().mean((1, 2))
    if probe.info.kind == "binary":
        return F.cross_entropy(maps, target.round().long(), reduction="none").mean((1, 2))
    return F.huber_loss(maps[:, 0], target.to(maps.dtype), delta=huber_delta, reduction="none").mean((1, 2))


class ProbeObjective:
    """``objective(acts [B, T, C]) -> [B]``: one probe's task loss against one batch of targets.

    :param probe: the exported probe of the edited (layer, step).
    :param target: ``[B, H, W]`` at the probe's label size, in probe units (0/1 or z-units).
    :param huber_delta: regression tasks' Huber threshold (the protocol's 1).
    :param binary_loss: ``cross_entropy`` or ``squared`` (see the module docstring).
    """

    def __init__(self, probe: LinearProbe, target: Tensor, huber_delta: float = 1.0,
                 binary_loss: str = "cross_entropy") -> None:
        if binary_loss not in BINARY_LOSSES:
            raise ValueError(f"binary_loss must be one of {BINARY_LOSSES}, got {binary_loss!r}")
        info = probe.info
        if target.ndim != 3 or tuple(target.shape[1:]) != tuple(info.label_size):
            raise ValueError(f"probe {info.key} needs targets [batch, {info.label_size[0]}, {info.label_size[1]}] "
                             f"(its label size), got {tuple(target.shape)}; build targets at the generated image size")
        self.probe, self.kind, self.delta, self.binary_loss = probe, info.kind, huber_delta, binary_loss
        self.target = target.to(torch.float32)
        grid, (hh, ww) = tuple(info.token_grid), info.label_size
        self.exact = hh % grid[0] == 0 and ww % grid[1] == 0
        if self.exact and self.kind == "binary":
            self._fraction = block_mean(self.target, grid)               # [B, T] share of positive pixels
        elif self.exact:
            self._blocks = SortedBlocks(self.target, grid)

    def project(self, acts: Tensor, constrain: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The activation nearest to ``acts`` (per token, in L2) at which the probe reads the
        squared-error optimum: ``2f - 1`` for binary probes, the block mean of the target for
        regression ones. A linear probe reads ``z = x·w + b``, so the nearest such point moves each
        token along ``w`` only: ``x + w (t - z) / |w|²`` (the ``projection`` optimiser: the
        smallest edit that makes the probe read the target, which is what gradient descent on the
        squared loss converges to).

        ``constrain``: an orthogonal projection onto the edits allowed (:mod:`.erasure`); the
        nearest point within them moves along ``d = constrain(w)`` by ``(t - z) / (w·d)``."""
        self.probe._check(acts)
        if not self.exact:
            raise ValueError(f"the projection edit needs a label size that is a multiple of the token grid "
                             f"(probe {self.probe.info.key}: {tuple(self.probe.info.label_size)} vs "
                             f"{tuple(self.probe.info.token_grid)}); use optimizer: adam")
        weight = self.probe.weight.to(acts.dtype)
        bias = None if self.probe.bias is None else self.probe.bias.to(acts.dtype)
        if self.kind == "binary":
            w = weight[:, 1] - weight[:, 0]
            b = 0.0 if bias is None else bias[1] - bias[0]
            target = 2 * self._fraction.to(acts.dtype) - 1
        else:
            w, b = weight[:, 0], 0.0 if bias is None else bias[0]
            target = block_mean(self.target, tuple(self.probe.info.token_grid)).to(acts.dtype)
        d = w if constrain is None else constrain(w)
        norm = (w @ d).clamp_min(torch.finfo(acts.dtype).tiny)
        return acts + (target - (acts @ w + b)).unsqueeze(-1) * d / norm

    def __call__(self, acts: Tensor) -> Tensor:
        self.probe._check(acts)
        if not self.exact:
            return pixel_loss(self.probe, acts, self.target, self.delta, self.binary_loss)
        out = apply_probe(acts, self.probe.weight, self.probe.bias)     # [B, T, out]
        if self.kind == "binary" and self.binary_loss == "squared":
            # per block: mean over its pixels of (z - (2y - 1))² = (z - (2f - 1))² + 4 f (1 - f)
            f = self._fraction
            return ((out[..., 1] - out[..., 0] - (2 * f - 1)).square() + 4 * f * (1 - f)).mean(-1)
        if self.kind == "binary":
            return binary_loss(out.unsqueeze(1), self._fraction)[:, 0]
        return regression_loss(out[..., 0].unsqueeze(1), self.target, tuple(self.probe.info.token_grid),
                               self.delta, self._blocks)[:, 0]
