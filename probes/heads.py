"""A bank of linear probes: every (step, layer) probe of one task, trained in one pass.

Per layer, the probes of all S steps are one ``[S, C, out]`` weight: a batch of activations
``[B, S, T, C]`` goes through all of them with one batched matmul. Adam is elementwise and the
summed loss gives each head the gradient of its own loss, so this trains exactly the same
probes as S separate runs (tested), at the cost of one.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from data.layers import LayerInfo


def layer_key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "_")


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
        if steps is not None:
            w = w[steps]
        out = torch.einsum("bstc,sco->bsto", x, w)
        if self.bias is not None:
            b = self.bias[layer_key(name)]
            out = out + (b[steps] if steps is not None else b)[None, :, None, :]
        return out


def huber(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    d = (pred - target).abs()
    return torch.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta))


def regression_loss(pred: Tensor, target: Tensor, grid: tuple[int, int], delta: float = 1.0) -> Tensor:
    """Per-image Huber loss of nearest-upsampled token predictions.

    ``pred [B, K, T]``, ``target [B, H, W]`` -> ``[B, K]``. Broadcasting a token over its block of
    pixels is nearest upsampling, without materialising the upsampled map per head.
    """
    b, k, _ = pred.shape
    h, w = grid
    hh, ww = target.shape[-2:]
    p = pred.reshape(b, k, h, 1, w, 1)
    y = target.reshape(b, 1, h, hh // h, w, ww // w)
    return huber(p, y, delta).mean(dim=(2, 3, 4, 5))


def binary_loss(logits: Tensor, positive_fraction: Tensor) -> Tensor:
    """Per-image 2-class cross-entropy of nearest-upsampled token logits, computed exactly from
    each block's share of positive pixels (the logits are constant over the block).

    ``logits [B, K, T, 2]``, ``positive_fraction [B, T]`` -> ``[B, K]``.
    """
    lsm = torch.log_softmax(logits, dim=-1)
    f = positive_fraction.unsqueeze(1).to(lsm.dtype)
    return -(f * lsm[..., 1] + (1 - f) * lsm[..., 0]).mean(-1)
