"""A bank of linear probes: every (step, layer) probe of one task, trained in one pass.

Per layer, the probes of all S steps are one ``[S, C, out]`` weight: a batch of activations
``[B, S, T, C]`` goes through all of them with one batched matmul. Adam is elementwise and the
summed loss gives each head the gradient of its own loss, so this trains exactly the same
probes as S separate runs (tested), at the cost of one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from probes.diffusion.layers import LayerInfo


def layer_key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "_")


def apply_probe(acts: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Token-wise linear map, the one definition of "applying a probe".

    ``acts [..., T, C] @ weight [..., C, out] (+ bias [..., out])`` -> ``[..., T, out]``; leading
    dimensions broadcast, so one call serves a single exported probe (``[B, T, C] @ [C, out]``),
    a bank of per-step probes (``[B, S, T, C] @ [S, C, out]``) and one image's steps.
    """
    out = acts.to(weight.dtype) @ weight
    return out if bias is None else out + bias.unsqueeze(-2)


def token_map(out: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``[N, T, out]`` token outputs -> ``[N, out, H, W]``, nearest-upsampled as the protocol does."""
    h, w = grid
    maps = out.transpose(-1, -2).reshape(out.shape[0], -1, h, w)
    return torch.nn.functional.interpolate(maps, size=tuple(size), mode="nearest")


def to_label_units(maps: Tensor, kind: str, target_norm: dict[str, float] | None) -> Tensor:
    """``[N, out, H, W]`` raw outputs -> label maps: a bool mask (binary) or de-normalised values."""
    if kind == "binary":
        return maps[:, 1] > maps[:, 0]
    norm = target_norm or {"mean": 0.0, "std": 1.0}
    return maps[:, 0] * norm["std"] + norm["mean"]


class ProbeBank(nn.Module):
    """Linear token-wise probes ``C -> out`` for ``num_steps`` steps of each layer (no bias by default)."""

    def __init__(self, layers: Sequence[LayerInfo], num_steps: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.layers = list(layers)
        self.num_steps, self.out_dim = num_steps, out_dim
        self.weight = nn.ParameterDict({layer_key(l.name): nn.Parameter(torch.empty(num_steps, l.channels, out_dim))
                                        for l in self.layers})
        self.bias = nn.ParameterDict({layer_key(l.name): nn.Parameter(torch.empty(num_steps, out_dim))
                                      for l in self.layers}) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, per head (the reference used ``nn.Linear``)."""
        for layer in self.layers:
            bound = 1.0 / math.sqrt(layer.channels)
            nn.init.uniform_(self.weight[layer_key(layer.name)], -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias[layer_key(layer.name)], -bound, bound)

    def forward_layer(self, name: str, x: Tensor, steps: slice | None = None) -> Tensor:
        """``x [B, S, T, C]`` -> ``[B, S, T, out]`` (``steps`` selects a subset of heads)."""
        w = self.weight[layer_key(name)]
        b = self.bias[layer_key(name)] if self.bias is not None else None
        if steps is not None:
            w, b = w[steps], (b[steps] if b is not None else None)
        return apply_probe(x, w, b)


class SortedBlocks:
    """Each token's block of target pixels, sorted, with prefix sums of values and squares.

    Built once per batch and token grid, shared by every head: the Huber loss of a constant
    prediction over a block then needs two binary searches instead of a pass over its pixels.
    """

    def __init__(self, target: Tensor, grid: tuple[int, int]) -> None:
        b, hh, ww = target.shape
        h, w = grid
        if hh % h or ww % w:
            raise ValueError(f"label size {hh}x{ww} is not a multiple of the token grid {h}x{w}")
        m = (hh // h) * (ww // w)
        blocks = target.reshape(b, h, hh // h, w, ww // w).permute(0, 1, 3, 2, 4).reshape(b, h * w, m)
        self.sorted = blocks.sort(dim=-1).values.contiguous()                 # [B, T, m]
        zero = torch.zeros(b, h * w, 1, dtype=target.dtype, device=target.device)
        self.s1 = torch.cat([zero, self.sorted.cumsum(-1)], -1)               # [B, T, m+1]
        self.s2 = torch.cat([zero, (self.sorted * self.sorted).cumsum(-1)], -1)
        self.m = m


def huber_blocks(pred: Tensor, blocks: SortedBlocks, delta: float = 1.0) -> Tensor:
    """Per-image mean Huber loss of block-constant predictions: ``pred [B, K, T]`` -> ``[B, K]``.

    For a constant p over a block with sorted targets y: pixels with y < p - δ cost δ(p - y - δ/2),
    pixels with |p - y| <= δ cost (p - y)²/2, pixels with y > p + δ cost δ(y - p - δ/2); each sum
    is a closed form in p and the prefix sums, so this equals the pixel-level loss exactly (and
    autograd gives the exact gradient), at O(log m) per token instead of O(m).
    """
    p = pred.transpose(1, 2).contiguous()                                         # [B, T, K]
    lo = torch.searchsorted(blocks.sorted, (p - delta).contiguous(), side="left")  # y <  p - δ
    hi = torch.searchsorted(blocks.sorted, (p + delta).contiguous(), side="right")  # y <= p + δ
    s1, s2, m = blocks.s1, blocks.s2, blocks.m
    s1_lo, s1_hi = s1.gather(-1, lo), s1.gather(-1, hi)
    s2_lo, s2_hi = s2.gather(-1, lo), s2.gather(-1, hi)
    n_lo, n_mid, n_hi = lo.to(p.dtype), (hi - lo).to(p.dtype), (m - hi).to(p.dtype)
    low = delta * (n_lo * (p - delta / 2) - s1_lo)
    mid = 0.5 * (n_mid * p * p - 2 * p * (s1_hi - s1_lo) + (s2_hi - s2_lo))
    high = delta * ((s1[..., -1:] - s1_hi) - n_hi * (p + delta / 2))
    return ((low + mid + high) / m).mean(1)                                       # mean over tokens -> [B, K]


def regression_loss(pred: Tensor, target: Tensor, grid: tuple[int, int], delta: float = 1.0,
                    blocks: SortedBlocks | None = None) -> Tensor:
    """Per-image Huber loss of nearest-upsampled token predictions.

    ``pred [B, K, T]``, ``target [B, H, W]`` -> ``[B, K]``, exactly the loss of the upsampled map
    (see :func:`huber_blocks`); pass ``blocks`` to share the sorted targets between calls.
    """
    return huber_blocks(pred, blocks if blocks is not None else SortedBlocks(target, grid), delta)


def binary_loss(logits: Tensor, positive_fraction: Tensor) -> Tensor:
    """Per-image 2-class cross-entropy of nearest-upsampled token logits, computed exactly from
    each block's share of positive pixels (the logits are constant over the block).

    ``logits [B, K, T, 2]``, ``positive_fraction [B, T]`` -> ``[B, K]``.
    """
    lsm = torch.log_softmax(logits, dim=-1)
    f = positive_fraction.unsqueeze(1).to(lsm.dtype)
    return -(f * lsm[..., 1] + (1 - f) * lsm[..., 0]).mean(-1)


def upsample_tokens(q: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Token values ``[..., T]`` -> ``[..., H, W]``, each token filling its block (nearest upsampling)."""
    h, w = grid
    hh, ww = size
    lead = q.shape[:-1]
    return q.reshape(*lead, h, 1, w, 1).expand(*lead, h, hh // h, w, ww // w).reshape(*lead, hh, ww)


class GainBank(ProbeBank):
    """Activation+prior heads: per (step, layer) a token-wise probe ``C -> 1`` plus the head's own weight
    ``a`` of the prior map (``prior_weight``, one per step; initialised to 1), predicting
    ``up(x w) + a * prior`` (:mod:`probes.metrics.offset_heads`)."""

    def __init__(self, layers: Sequence[LayerInfo], num_steps: int, bias: bool = False) -> None:
        super().__init__(layers, num_steps, 1, bias=bias)
        self.prior_weight = nn.ParameterDict({layer_key(l.name): nn.Parameter(torch.ones(num_steps))
                                              for l in self.layers})

    def scale(self, name: str) -> Tensor:
        """``[S]`` the prior's weight in each step's head of layer ``name``."""
        return self.prior_weight[layer_key(name)]


def offset_pixels(q: Tensor, grid: tuple[int, int], offset: Tensor, scale: Tensor) -> Tensor:
    """``up(q) + a * offset``: ``q [B, K, T]``, ``offset [H, W]``, ``scale [K]`` -> ``[B, K, H, W]``."""
    up = upsample_tokens(q, grid, tuple(offset.shape))
    return up + scale.to(up.dtype)[:, None, None] * offset.to(up.dtype)


def offset_binary_loss(logits: Tensor, grid: tuple[int, int], offset: Tensor, scale: Tensor, mask: Tensor) -> Tensor:
    """Per-image cross-entropy of pixel logits ``up(logits) + a * offset`` against a 0/1 ``mask`` -> ``[B, K]``.

    The offset (the prior's logit minus its threshold's) varies within a token's block, so this is a
    mean over pixels, not blocks.
    """
    z = offset_pixels(logits, grid, offset, scale)
    y = mask.unsqueeze(1).to(z.dtype)
    return (torch.nn.functional.softplus(z) - y * z).mean((-2, -1))


def offset_regression_loss(pred: Tensor, grid: tuple[int, int], offset: Tensor, scale: Tensor, target: Tensor,
                           delta: float = 1.0) -> Tensor:
    """Per-image Huber loss ``[B, K]`` of ``up(pred) + a * offset`` against ``target [B, H, W]``, over pixels."""
    z = offset_pixels(pred, grid, offset, scale)
    return torch.nn.functional.huber_loss(z, target.unsqueeze(1).to(z.dtype).expand_as(z), reduction="none",
                                          delta=delta).mean((-2, -1))
