"""Per-image scores of many heads that add a scaled fixed pixel map to a block-constant prediction.

A probe fitted on top of the prior map ("activations + prior", the head the gain over position is
measured with) predicts ``up(q) + a * offset``: the probe's token values nearest-upsampled, plus the
prior map with the head's own weight ``a``, which varies *within* a token's block of pixels. The block shortcuts of
:mod:`probes.metrics.exact` rely on a block-constant map, so these heads are scored at pixel level,
with the definitions of :mod:`probes.metrics.image_scores` (Dice with ``eps``, Pearson and Spearman
per image with ties averaged and 0 for a constant map, RMSE in target units), in torch, for many
heads at once, a chunk of heads at a time so a 512x512 label never needs all heads in memory.

A binary head is positive where ``up(q) + a * offset > 0``, the offset being the prior minus its
(validation-picked) threshold: with ``q = 0`` and ``a > 0`` it is exactly the prior thresholded
where the prior is, so the gain of a head that learnt nothing is exactly 0.

Pearson and RMSE need no upsampled map: with ``p`` the offset and block means ``ȳ_t``, ``p̄_t``,

    cov(up(q) + a p, y) = mean_t(q ȳ) − q̄ ȳ + a cov(p, y)
    var(up(q) + a p)    = var_t(q) + a² var(p) + 2 a (mean_t(q p̄) − q̄ p̄)
    mse                 = mean_t(q²) + 2 mean_t(q (a p̄ − ȳ)) + a² mean(p²) − 2 a mean(p y) + mean(y²)

so they cost O(tokens) per head (:class:`OffsetTargets`); only Spearman ranks every pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probes.metrics.exact import DICE_EPS, average_ranks, block_mean
from probes.tasks import Task

#: float64 elements of upsampled maps held at once (128 MB)
MAX_ELEMENTS = 2 ** 24


def _scale(scale: Tensor | None, k: int, like: Tensor) -> Tensor:
    if scale is None:
        return torch.ones(k, dtype=torch.float64, device=like.device)
    a = scale.to(device=like.device, dtype=torch.float64).reshape(-1)
    if a.numel() != k:
        raise ValueError(f"one prior weight per head: {k} heads, {a.numel()} weights")
    return a


def offset_maps(q: Tensor, grid: tuple[int, int], offset: Tensor, scale: Tensor | None = None) -> Tensor:
    """``[B, K, H*W]`` float64 maps ``up(q) + a * offset`` of token values ``q [B, K, T]`` (``a = scale [K]``, default 1)."""
    b, k, t = q.shape
    h, w = grid
    hh, ww = offset.shape
    if t != h * w or hh % h or ww % w:
        raise ValueError(f"token values {tuple(q.shape)} do not fit the grid {grid} and the map size {hh}x{ww}")
    up = q.to(torch.float64).reshape(b, k, h, 1, w, 1).expand(b, k, h, hh // h, w, ww // w).reshape(b, k, hh, ww)
    a = _scale(scale, k, q)[None, :, None, None]
    return (up + a * offset.to(device=q.device, dtype=torch.float64)).reshape(b, k, hh * ww)


def _pearson_rows(a: Tensor, y: Tensor) -> Tensor:
    """Pearson of every row of ``a [B, K, P]`` with ``y [B, P]``; 0 where either is constant."""
    ac = a - a.mean(-1, keepdim=True)
    yc = (y - y.mean(-1, keepdim=True)).unsqueeze(1)
    num = (ac * yc).sum(-1)
    den = ((ac * ac).sum(-1) * (yc * yc).sum(-1)).sqrt()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _chunks(k: int, per_head: int) -> list[slice]:
    size = max(1, MAX_ELEMENTS // max(per_head, 1))
    return [slice(s, min(s + size, k)) for s in range(0, k, size)]


@dataclass
class OffsetTargets:
    """Per-image statistics of targets and one offset map at one token grid (shared by all heads)."""

    y_block: Tensor     # [B, T] block means of y
    p_block: Tensor     # [T]    block means of the offset
    y_mean: Tensor      # [B]
    y_var: Tensor       # [B]
    p_mean: Tensor      # []
    p_var: Tensor       # []
    cov_py: Tensor      # [B]
    pp: Tensor          # []  mean(p^2)
    py: Tensor          # [B] mean(p y)
    yy: Tensor          # [B] mean(y^2)

    @classmethod
    def build(cls, target: Tensor, grid: tuple[int, int], offset: Tensor) -> OffsetTargets:
        y = target.to(torch.float64)
        p = offset.to(device=y.device, dtype=torch.float64)
        yf, pf = y.reshape(y.shape[0], -1), p.reshape(-1)
        ym, pm = yf.mean(-1), pf.mean()
        return cls(y_block=block_mean(y, grid), p_block=block_mean(p[None], grid)[0], y_mean=ym,
                   y_var=yf.var(-1, unbiased=False), p_mean=pm, p_var=pf.var(unbiased=False),
                   cov_py=((yf - ym[:, None]) * (pf - pm)).mean(-1), pp=(pf * pf).mean(), py=(yf * pf).mean(-1),
                   yy=(yf * yf).mean(-1))


def offset_pearson(q: Tensor, ot: OffsetTargets, scale: Tensor | None = None) -> Tensor:
    """Pixel-level Pearson ``[B, K]`` of ``up(q) + a p`` with ``y`` from block statistics (module docstring)."""
    q = q.to(torch.float64)
    a = _scale(scale, q.shape[1], q)
    qm = q.mean(-1)                                                             # [B, K]
    cov = (q * ot.y_block[:, None]).mean(-1) - qm * ot.y_mean[:, None] + a * ot.cov_py[:, None]
    var = q.var(-1, unbiased=False) + a * a * ot.p_var + 2 * a * ((q * ot.p_block).mean(-1) - qm * ot.p_mean)
    den = (var.clamp_min(0) * ot.y_var[:, None]).sqrt()
    return torch.where(den > 0, cov / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(cov))


def offset_rmse(q: Tensor, ot: OffsetTargets, scale: Tensor | None = None) -> Tensor:
    """Pixel-level RMSE ``[B, K]`` of ``up(q) + a p`` against ``y`` from block statistics."""
    q = q.to(torch.float64)
    a = _scale(scale, q.shape[1], q)
    mse = ((q * q).mean(-1) + 2 * (q * (a[:, None] * ot.p_block - ot.y_block[:, None, :])).mean(-1)
           + a * a * ot.pp - 2 * a * ot.py[:, None] + ot.yy[:, None])
    return mse.clamp_min(0).sqrt()


def offset_head_scores(task: Task, q: Tensor, grid: tuple[int, int], offset: Tensor, target: Tensor,
                       scale: Tensor | None = None) -> Tensor:
    """Per-image scores ``[B, K, M]`` of ``task.metrics`` for heads ``up(q) + a * offset``.

    :param q: token outputs ``[B, K, T]`` of K heads (in the head's target space).
    :param offset: ``[H, W]`` map (the prior in the same space; binary: minus its threshold).
    :param target: ``[B, H, W]`` targets: z-scored values (regression) or a 0/1 mask (binary).
    :param scale: ``[K]`` each head's weight ``a`` of the offset (default 1). Binary tasks: a pixel is
        positive where ``up(q) + a * offset > 0``.
    """
    b, k, _ = q.shape
    pixels = target.shape[-1] * target.shape[-2]
    y = target.reshape(b, -1).to(torch.float64)
    parts = []
    a = _scale(scale, k, q)
    if task.kind == "binary":
        t_pos = y > 0.5
        for sl in _chunks(k, b * pixels):
            pos = offset_maps(q[:, sl], grid, offset, a[sl]) > 0                       # [B, k, P]
            inter = (pos & t_pos.unsqueeze(1)).sum(-1).to(torch.float64)
            parts.append(((2 * inter + DICE_EPS) / (pos.sum(-1) + t_pos.sum(-1, keepdim=True) + DICE_EPS)).unsqueeze(-1))
        return torch.cat(parts, 1)
    unknown = [m for m in task.metrics if m not in ("pearson", "spearman", "rmse")]
    if unknown:
        raise ValueError(f"no pixel-level definition of metric(s) {unknown} for activation+prior heads "
                         f"(task {task.name!r}); known: pearson, spearman, rmse, dice")
    ot = OffsetTargets.build(target, grid, offset)
    cols: dict[str, Tensor] = {"pearson": offset_pearson(q, ot, a), "rmse": offset_rmse(q, ot, a)}
    if "spearman" in task.metrics:
        ranks = average_ranks(y)
        for sl in _chunks(k, b * pixels * 2):
            maps = offset_maps(q[:, sl], grid, offset, a[sl])
            r = average_ranks(maps.reshape(-1, pixels)).reshape(maps.shape)
            parts.append(_pearson_rows(r, ranks))
        cols["spearman"] = torch.cat(parts, 1)
    return torch.stack([cols[m] for m in task.metrics], -1)
