"""Per-image metrics of many probes at once, computed exactly from token-level predictions.

A probe predicts one value per token; the protocol nearest-upsamples it to the label resolution
(e.g. 64x64 tokens -> 512x512 pixels, 64 pixels per token) and scores it per image. Because the
upsampled map is constant on each token's block of pixels, every metric can be computed from
per-block statistics of the *target* (block mean, block mean of squares, block mean of pixel
ranks), which are shared by all heads: O(tokens) per head instead of O(pixels log pixels).
This is exact, not an approximation, and the tests check it against scipy on upsampled maps:

- Pearson(p, y) over pixels = cov_blocks(q, mean_b y) / (std_blocks(q) * std_pixels(y));
- Spearman = the same with q replaced by its token ranks (ties averaged; a token's pixel rank is
  an affine function of its token rank) and y by its pixel ranks;
- RMSE^2 = mean_b(q^2 - 2 q mean_b(y) + mean_b(y^2));
- Dice = (2 sum_b P_b |T_b| + eps) / (m sum_b P_b + |T| + eps), m pixels per block.

Aggregation over images lives in :class:`HeadMetrics`, a torchmetrics ``Metric`` with sum/count
states, so validation and test metrics are all-reduced correctly under DDP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from probes.tasks import Task

DICE_EPS = 1e-6


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim, ties given their average rank (``scipy.stats.rankdata``)."""
    shape, n = x.shape, x.shape[-1]
    flat = x.reshape(-1, n)
    values, order = flat.sort(dim=-1)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.cumsum(-1) - 1
    pos = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand_as(values)
    total = torch.zeros_like(pos).scatter_add_(1, group, pos)
    count = torch.zeros_like(pos).scatter_add_(1, group, torch.ones_like(pos))
    ranks_sorted = (total / count.clamp_min(1)).gather(1, group)
    return torch.empty_like(pos).scatter_(1, order, ranks_sorted).reshape(shape)


def block_mean(y: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, H, W]`` -> ``[B, h*w]`` means over each token's block of pixels."""
    b, hh, ww = y.shape
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"label size {hh}x{ww} is not a multiple of the token grid {h}x{w}; "
                         f"generate at a resolution whose latent grid divides it")
    return y.reshape(b, h, hh // h, w, ww // w).mean(dim=(2, 4)).reshape(b, h * w)


@dataclass
class BlockTargets:
    """Per-block statistics of a batch of target maps at one token grid (shared by all heads)."""

    mean: Tensor        # [B, T] block means of y
    sq: Tensor          # [B, T] block means of y^2
    y_mean: Tensor      # [B] pixel mean
    y_var: Tensor       # [B] pixel variance
    rank_mean: Tensor | None = None   # [B, T] block means of pixel ranks of y
    rank_var: Tensor | None = None    # [B]
    pixels_per_block: int = 1

    @classmethod
    def build(cls, y: Tensor, grid: tuple[int, int], ranks: bool = True) -> BlockTargets:
        y64 = y.to(torch.float64)
        m = (y.shape[1] // grid[0]) * (y.shape[2] // grid[1])
        flat = y64.reshape(y.shape[0], -1)
        out = cls(mean=block_mean(y64, grid), sq=block_mean(y64 * y64, grid), y_mean=flat.mean(-1),
                  y_var=flat.var(-1, unbiased=False), pixels_per_block=m)
        if ranks:
            r = average_ranks(flat).reshape(y.shape)
            out.rank_mean = block_mean(r, grid)
            out.rank_var = r.reshape(y.shape[0], -1).var(-1, unbiased=False)
        return out


def _pearson_blocks(q: Tensor, yb: Tensor, y_var: Tensor) -> Tensor:
    """Pixel-level Pearson of a block-constant map ``q [B, K, T]`` with a map of block means ``yb [B, T]``."""
    qc = q - q.mean(-1, keepdim=True)
    yc = (yb - yb.mean(-1, keepdim=True)).unsqueeze(1)
    cov = (qc * yc).mean(-1)
    denom = (qc.pow(2).mean(-1) * y_var.unsqueeze(1)).sqrt()
    r = cov / denom
    return torch.where(denom > 0, r, torch.zeros_like(r))  # constant map: no correlation


def pearson(q: Tensor, t: BlockTargets) -> Tensor:
    return _pearson_blocks(q.to(torch.float64), t.mean, t.y_var)


def spearman(q: Tensor, t: BlockTargets) -> Tensor:
    assert t.rank_mean is not None and t.rank_var is not None, "BlockTargets built without ranks"
    return _pearson_blocks(average_ranks(q.to(torch.float64)), t.rank_mean, t.rank_var)


def rmse(q: Tensor, t: BlockTargets) -> Tensor:
    q = q.to(torch.float64)
    mse = (q * q - 2 * q * t.mean.unsqueeze(1) + t.sq.unsqueeze(1)).mean(-1)
    return mse.clamp_min(0).sqrt()


def dice(positive: Tensor, t: BlockTargets, eps: float = DICE_EPS) -> Tensor:
    """Hard Dice of a block-constant 0/1 prediction against a 0/1 target; both empty -> 1."""
    p = positive.to(torch.float64)
    m = t.pixels_per_block
    inter = m * (p * t.mean.unsqueeze(1)).sum(-1)
    return (2 * inter + eps) / (m * p.sum(-1) + m * t.mean.sum(-1).unsqueeze(1) + eps)


REGRESSION_METRICS = {"spearman": spearman, "pearson": pearson, "rmse": rmse}


def task_scores(task: Task, pred: Tensor, blocks: BlockTargets) -> Tensor:
    """Per-image scores ``[B, S, M]`` of ``task.metrics``, in that order: the one place metrics are chosen by name.

    :param pred: token predictions ``[B, S, T]``: a bool mask of the positive class (binary tasks)
        or values in target units (regression tasks).
    """
    if task.kind == "binary":
        return dice(pred, blocks).unsqueeze(-1)
    return torch.stack([REGRESSION_METRICS[m](pred, blocks) for m in task.metrics], -1)


class HeadMetrics(Metric):
    """Running per-image means of several metrics for ``num_heads`` heads.

    ``update(values, heads)`` takes per-image values ``[B, K, M]`` for the heads ``heads``
    (a slice of K of them). States are sums and counts (``dist_reduce_fx="sum"``), so
    ``compute`` gives the exact mean over all images of all ranks.
    """

    full_state_update = False

    def __init__(self, metric_names: list[str], num_heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.metric_names = list(metric_names)
        self.add_state("total", torch.zeros(len(metric_names), num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_heads, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, heads: slice) -> None:  # type: ignore[override]
        v = values.to(torch.float64)
        self.total[:, heads] += v.sum(0).transpose(0, 1)
        self.count[heads] += v.shape[0]

    def compute(self) -> Tensor:
        """``[M, num_heads]`` means (NaN for heads that saw no image)."""
        return self.total / self.count.clamp_min(1) + torch.where(self.count > 0, 0.0, float("nan"))
