"""One-pass mean-difference probes: the direction along which the classes' mean activations differ.

Why a second closed-form probe: a least-squares (ridge) probe finds *whatever* direction predicts
the label best, and in a network whose token activations vary little around a large shared mean
that is often a low-variance direction the network itself does not read: on the toy model the
ridge directions of the decoder layers are nearly orthogonal to the class-mean difference
(cosine 0.01-0.3) and 25-150x longer. Editing along such a direction changes what the probe reads
without changing the image. The mean difference (for regression: the covariance of activation
and target) is the direction the activations actually move with the label, which is what an
intervention should push along (the "mass-mean" probes of Marks & Tegmark 2023 and the mean-shift
edits of Li et al. 2023 rest on the same observation).

Each head is ``y ≈ a (x - x̄)·d + ȳ`` with ``d = Cov(x, y)`` over the train split's tokens and the
scale ``a`` fitted by least squares along ``d`` (``a = |d|² / dᵀ Cov(x) d``); binary tasks use
``y = 2f - 1`` (``f``: a token's share of positive pixels) and are exported as two logits
``[-(w x + b)/2, (w x + b)/2]`` like the ridge probes, so their Dice is comparable. The sums are
the ridge module's own (``XᵀX``, ``Σx``, ``Σ f x``, the token count and the target sums), so the
same single pass (streamed or cached, one process or DDP) fits both; nothing is selected on
validation, so no validation split is needed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from probes.tasks import get_task
from probes.training.heads import layer_key
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule, as_bank_weight


def mean_difference_head(gram: Tensor, sum_x: Tensor, sum_xy: Tensor, sum_y: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """``(w [S, C], b [S])`` of ``y ≈ x·w + b`` along ``d = Cov(x, y)`` from one pass's sums.

    :param gram: ``Σ x xᵀ`` per step ``[S, C, C]``; ``sum_x``: ``Σ x`` ``[S, C]``; ``sum_xy``:
        ``Σ y x`` ``[S, C]``; ``sum_y``: ``Σ y`` ``[S]`` or scalar; ``n``: token count.
    A head whose activations do not vary along ``d`` (no signal) gets ``w = 0`` and predicts ``ȳ``.
    """
    xbar = sum_x / n                                                     # [S, C]
    ybar = torch.as_tensor(sum_y, dtype=sum_x.dtype, device=sum_x.device) / n
    ybar = ybar.expand(xbar.shape[0]) if ybar.ndim == 0 else ybar         # [S]
    d = sum_xy / n - xbar * ybar[:, None]                                # Cov(x, y)
    cov_x = gram / n - xbar[:, :, None] * xbar[:, None, :]              # Cov(x)
    var = torch.einsum("sc,scd,sd->s", d, cov_x, d)                      # Var(x·d)
    dd = (d * d).sum(-1)
    # |d| at rounding level (no covariance with the target) is no direction: predict the mean
    scale = torch.einsum("scc->s", cov_x).clamp_min(torch.finfo(d.dtype).tiny) * ybar.abs().clamp_min(1.0)
    signal = dd.sqrt() > 1e-9 * scale.sqrt()
    ok = signal & (var > 0)
    a = torch.where(ok, dd / var.clamp_min(torch.finfo(var.dtype).tiny), torch.zeros_like(var))
    w = a[:, None] * d
    return w, ybar - (w * xbar).sum(-1)


class MeanDifferenceProbeModule(RidgeProbeModule):
    """Mean-difference probes in one pass (see the module docstring); probes get a bias.

    :param tasks: tasks to probe; default every task the data has labels for.
    :param threshold: a binary task's label is positive where ``label > threshold``.
    """

    probe_bias = True
    selects_lambda = False

    def __init__(self, tasks: list[str] | None = None, threshold: float = 0.0) -> None:
        # no activation+prior heads yet: the mean difference of the residual z - P is not fitted here
        super().__init__(tasks=tasks, lambdas=(0.0,), threshold=threshold, gain=False)

    def build(self, spec) -> None:
        ProbeModule.build(self, spec)          # no λ grid to score

    # validation and test score the fitted bank like any probe: nothing is chosen there
    validation_step = ProbeModule.validation_step
    on_validation_epoch_end = ProbeModule.on_validation_epoch_end

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True
        if self._sums:
            self.solve()

    def solve(self) -> None:
        """All-reduce the sums, set target statistics and write every head's weight and bias."""
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._sums.items())}
        self.spec = self.spec.with_target_stats(self.target_stats_from(sums))
        self.check_masks(sums)
        with torch.no_grad():
            for layer in self.spec.layers:
                n, sx = sums[f"count/{layer.name}"], sums[f"sumx/{layer.name}"]
                for t, bank in self.banks.items():
                    task = get_task(t)
                    xy, ysum = sums[f"xy/{t}/{layer.name}"], sums[f"ytok/{t}/{layer.name}"]
                    if task.kind == "binary":                  # targets 2f - 1
                        xy, ysum = 2 * xy - sx, 2 * ysum - n
                    else:                                      # z-scored targets
                        st = self.spec.target_stats[t]
                        xy, ysum = (xy - st["mean"] * sx) / st["std"], (ysum - st["mean"] * n) / st["std"]
                    w, b = mean_difference_head(sums[f"gram/{layer.name}"], sx, xy, ysum, n)
                    key = layer_key(layer.name)
                    bank.weight[key].copy_(as_bank_weight(w.to(torch.float32), task.kind))
                    bank.bias[key].copy_(as_bank_weight(b.to(torch.float32)[:, None], task.kind)[:, 0])
        self._sums.clear()
