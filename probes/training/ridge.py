"""One-pass closed-form probes: ridge regression for every (step, layer) head, no activation cache.

During the single training "epoch" the module only accumulates, per layer and step, the Gram
matrix ``XᵀX`` over tokens (shared by all tasks) and, per task, ``Xᵀy`` with ``y`` the token-
averaged target (each token's block mean of the label). Minimising the pixel-level squared error
of a nearest-upsampled token prediction is the same as least squares on block means (the
within-block variance is a constant), so this is exact least squares on the protocol's maps.

- Regression tasks: targets z-scored with the train split's pixel statistics (accumulated here:
  a streamed run has no store to compute them from beforehand).
- Foreground: least squares on ``2 f - 1`` (``f`` = a token's share of positive pixels), exported
  as two logits ``[-w/2, w/2]`` so the positive class is ``Xw > 0``, like the SGD probe's argmax.

After the pass, each layer's Gram matrices are eigendecomposed once and ``W(λ)`` is formed for
every λ of the grid (λ relative to the mean eigenvalue, so one grid fits every layer). Validation
scores every λ of every head; each head keeps the λ with the best validation headline metric.
Fitting stops after the first epoch (whatever ``max_epochs`` says). Works on streamed batches (``data.mode: streaming``) and on cached ones alike; sums are
all-reduced across ranks, so DDP gives the same probes as one process.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from probes.metrics.exact import BlockTargets, HeadMetrics, block_mean
from probes.tasks import LOWER_IS_BETTER, get_task
from probes.training.heads import layer_key
from probes.training.module import ProbeModule, check_binary_fraction

DEFAULT_LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def as_bank_weight(w: Tensor, kind: str) -> Tensor:
    """Ridge solution ``[S, C]`` -> bank weight ``[S, C, out]``: binary tasks get the two logits
    ``[-w/2, w/2]`` (positive where ``Xw > 0``, like the SGD probe's argmax)."""
    return torch.stack([-w / 2, w / 2], -1) if kind == "binary" else w.unsqueeze(-1)


class RidgeProbeModule(ProbeModule):
    """Closed-form probes in one pass over the data (see the module docstring).

    :param tasks: tasks to probe; default every task the data has labels for.
    :param lambdas: ridge strengths, relative to the mean eigenvalue of each head's ``XᵀX``.
    :param threshold: a binary task's label is positive where ``label > threshold``.
    """

    binary_fit_loss = "squared"      # least squares on 2f - 1
    #: whether the probes get a bias (subclasses fitting an offset set it)
    probe_bias = False
    #: whether fitting picks something (λ) on the validation split, so that it needs one
    selects_lambda = True

    def __init__(self, tasks: list[str] | None = None, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
                 threshold: float = 0.0) -> None:
        super().__init__(tasks=tasks, lr=None, bias=self.probe_bias, threshold=threshold, selection="last")
        self.save_hyperparameters()
        self.hparams.update(lr=None, bias=self.probe_bias, huber_delta=1.0, selection="last")  # the base class reads these
        self.automatic_optimization = False
        self._sums: dict[str, Tensor] = {}
        self._candidates: dict[str, dict[str, Tensor]] = {}
        self.chosen_lambda: dict[str, Tensor] = {}

    def build(self, spec) -> None:
        super().build(spec)
        heads = len(spec.layers) * len(spec.steps) * len(self.hparams.lambdas)
        self.ridge_val = torch.nn.ModuleDict({t: HeadMetrics(list(get_task(t).metrics), heads) for t in self.banks})

    def configure_optimizers(self) -> None:
        return None

    one_pass = True

    def on_fit_start(self) -> None:
        if self.trainer.num_sanity_val_steps:
            raise ValueError("RidgeProbeModule solves after its one pass over the train split, so there is nothing "
                             f"to sanity-check: set trainer.num_sanity_val_steps=0 (got {self.trainer.num_sanity_val_steps})")

    # -- accumulation ----------------------------------------------------------------------
    def _add(self, key: str, value: Tensor) -> None:
        value = value.to(torch.float64)
        if key in self._sums:
            self._sums[key] += value
        else:
            self._sums[key] = value.clone()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            acts, labels = batch["acts"], batch["labels"]
            # float64 sums: the solve amplifies rounding by the Gram matrices' condition number, and
            # float32 sums would make the probes depend on how images were batched
            xs = {layer.name: acts[layer.name].to(torch.float64) for layer in self.spec.layers}  # [B, S, T, C]
            finite: dict[tuple[str, str], Tensor] = {}     # per (task, layer): [S] all inputs finite
            for layer in self.spec.layers:
                x = xs[layer.name]
                self._add(f"gram/{layer.name}", torch.einsum("bstc,bstd->scd", x, x))
                self._add(f"count/{layer.name}", torch.tensor(float(x.shape[0] * x.shape[2]), device=x.device))
                sx = x.sum(dim=(0, 2))                                                   # [S, C]
                self._add(f"sumx/{layer.name}", sx)
                finite[("*", layer.name)] = torch.isfinite(sx).all(-1)   # a sum is finite iff its terms are
            for t in self.banks:
                task = get_task(t)
                raw = labels[t].to(torch.float64)
                ok = torch.isfinite(raw).all()      # a NaN label is never > threshold: check before binarising
                for layer in self.spec.layers:
                    finite[(t, layer.name)] = ok.expand(len(self.spec.steps))
                y = (raw > self.hparams.threshold).to(torch.float64) if task.kind == "binary" else raw
                if task.kind == "regression":
                    self._add(f"ysum/{t}", raw.sum())
                    self._add(f"ysq/{t}", (raw * raw).sum())
                    self._add(f"ycount/{t}", torch.tensor(float(raw.numel()), device=raw.device))
                else:  # streamed labels are never scanned beforehand: count empty / full masks here
                    flat = y.reshape(y.shape[0], -1)
                    self._add(f"anypos/{t}", (flat.amax(1) > 0).sum())
                    self._add(f"allpos/{t}", (flat.amin(1) > 0).sum())
                    self._add(f"images/{t}", torch.tensor(float(y.shape[0]), device=y.device))
                for layer in self.spec.layers:
                    yb = block_mean(y.to(torch.float64), tuple(layer.grid))      # [B, T]
                    self._add(f"xy/{t}/{layer.name}", torch.einsum("bstc,bt->sc", xs[layer.name], yb))
                    self._add(f"ytok/{t}/{layer.name}", yb.sum())      # Σy and the count: centred solutions
            self._check_finite(finite, "train", batch)

    def _check_finite(self, finite: dict[tuple[str, str], Tensor], split: str, batch: dict[str, Any]) -> None:
        """One check per batch; on failure, name the heads (``*``: every task) and the samples."""
        if bool(torch.stack([v.all() for v in finite.values()]).all()):
            return
        heads = [(t, layer, self.spec.steps[s]) for (t, layer), ok in finite.items()
                 for s in torch.nonzero(~ok).reshape(-1).tolist()]
        tasks = list(self.banks)
        heads = [(tt, layer, step) for t, layer, step in heads for tt in (tasks if t == "*" else [t])]
        self._non_finite("inputs", split, batch, heads)

    def on_validation_epoch_start(self) -> None:
        # Lightning validates at the end of the training epoch *before* on_train_epoch_end
        if self._sums:
            self.solve()

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # one pass is the whole fit, whatever max_epochs says
        if self._sums:
            # no validation ran (trainer.limit_val_batches=0; the data module refuses a fit without a
            # val split): nothing to select λ on, so every head keeps the middle of the grid, said aloud
            self.solve()
            mid = len(self.hparams.lambdas) // 2
            if len(self.hparams.lambdas) > 1:
                from pytorch_lightning.utilities import rank_zero_warn

                rank_zero_warn(f"ridge probes: no validation ran, so λ was not selected: every head uses "
                               f"λ={self.hparams.lambdas[mid]} (the middle of model.init_args.lambdas). Pass a "
                               f"single λ to choose it yourself.")
            steps = len(self.spec.steps)
            with torch.no_grad():
                for t, bank in self.banks.items():
                    for layer in self.spec.layers:
                        w = self._candidates[t][layer.name][mid]
                        kind = get_task(t).kind
                        bank.weight[layer_key(layer.name)].copy_(as_bank_weight(w, kind))
                    self.chosen_lambda[t] = torch.full((len(self.spec.layers), steps), self.hparams.lambdas[mid])

    def target_stats_from(self, sums: dict[str, Tensor]) -> dict[str, dict[str, float]]:
        """Regression tasks' train-split pixel mean and std, from the pass's (all-reduced) sums."""
        stats = {}
        for t in self.banks:
            if get_task(t).kind == "regression":
                n = sums[f"ycount/{t}"]
                mean = sums[f"ysum/{t}"] / n
                std = (sums[f"ysq/{t}"] / n - mean * mean).clamp_min(0).sqrt()
                stats[t] = {"mean": float(mean), "std": float(std) if std > 0 else 1.0}
        return stats

    def check_masks(self, sums: dict[str, Tensor]) -> None:
        """Refuse binary tasks whose train masks are (almost) all empty or all full (streamed
        labels are never scanned beforehand, so the pass counted them)."""
        for t in self.banks:
            if f"images/{t}" in sums:
                dm = getattr(self._trainer, "datamodule", None)
                cache = getattr(dm, "label_caches", {}).get(t)
                check_binary_fraction(t, self.hparams.threshold, int(sums[f"anypos/{t}"]), int(sums[f"allpos/{t}"]),
                                      int(sums[f"images/{t}"]), None, str(getattr(cache, "path", "the train stream")))

    def solve(self) -> None:
        """All-reduce the sums, set target statistics, form W(λ) for every head and λ."""
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._sums.items())}
        lambdas = torch.tensor(self.hparams.lambdas, dtype=torch.float64, device=self.device)
        self.spec = self.spec.with_target_stats(self.target_stats_from(sums))  # the module's own spec; the data's stays
        self.check_masks(sums)
        for layer in self.spec.layers:
            evals, evecs = torch.linalg.eigh(sums[f"gram/{layer.name}"])                # [S, C], [S, C, C]
            evals = evals.clamp_min(0)
            scale = evals.mean(-1, keepdim=True) * lambdas[:, None, None]                # [K, S, 1]
            for t in self.banks:
                task = get_task(t)
                xy, sx = sums[f"xy/{t}/{layer.name}"], sums[f"sumx/{layer.name}"]        # [S, C]
                if task.kind == "binary":
                    rhs = 2 * xy - sx                                                      # Xᵀ(2f - 1)
                else:
                    st = self.spec.target_stats[t]
                    rhs = (xy - st["mean"] * sx) / st["std"]                              # Xᵀ z
                proj = torch.einsum("scd,sc->sd", evecs, rhs)                               # Qᵀ b
                w = torch.einsum("sdc,ksc->ksd", evecs, proj[None] / (evals[None] + scale))  # [K, S, C]
                self._candidates.setdefault(t, {})[layer.name] = w.to(torch.float32)
        self._sums.clear()

    # -- λ selection on validation ---------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.restored and not self._candidates:   # probes read from an export: scored as they are
            return ProbeModule.validation_step(self, batch, batch_idx)
        if not self._candidates:
            raise RuntimeError("validation before the ridge solve (set trainer.num_sanity_val_steps=0)")
        acts, labels = batch["acts"], batch["labels"]
        steps, nl, k = len(self.spec.steps), len(self.spec.layers), len(self.hparams.lambdas)
        finite: dict[tuple[str, str], Tensor] = {}
        for t in self.banks:
            task = get_task(t)
            label_ok = torch.isfinite(labels[t]).all()
            y = self.targets(task, labels[t])
            blocks: dict[tuple[int, int], BlockTargets] = {}
            for li, layer in enumerate(self.spec.layers):
                grid = tuple(layer.grid)
                if grid not in blocks:
                    blocks[grid] = BlockTargets.build(y, grid, ranks=task.kind != "binary")
                q = torch.einsum("bstc,ksc->bkst", acts[layer.name].to(torch.float32), self._candidates[t][layer.name])
                finite[(t, layer.name)] = torch.isfinite(q).all(-1).all(1).all(0) & label_ok     # [S]
                b = q.shape[0]
                q = q.reshape(b, k * steps, -1)                                           # heads (λ, step)
                out = torch.stack([-q / 2, q / 2], -1) if task.kind == "binary" else q.unsqueeze(-1)
                vals = self._metric_values(task, out, blocks[grid]).reshape(b, k, steps, -1)
                for ki in range(k):
                    start = (ki * nl + li) * steps
                    self.ridge_val[t].update(vals[:, ki], slice(start, start + steps))
        self._check_finite(finite, "val", batch)

    def on_validation_epoch_end(self) -> None:
        if self.restored and not self._candidates:
            return ProbeModule.on_validation_epoch_end(self)
        if self.trainer.sanity_checking:
            return
        steps, nl, k = len(self.spec.steps), len(self.spec.layers), len(self.hparams.lambdas)
        rows = []
        for t, bank in self.banks.items():
            task = get_task(t)
            vals = self.ridge_val[t].compute().reshape(len(task.metrics), k, nl, steps)   # [M, K, L, S]
            self.ridge_val[t].reset()
            primary = vals[0].nan_to_num(nan=float("-inf") if task.primary not in LOWER_IS_BETTER else float("inf"))
            best = primary.argmin(0) if task.primary in LOWER_IS_BETTER else primary.argmax(0)  # [L, S]
            self.chosen_lambda[t] = torch.tensor(self.hparams.lambdas, dtype=torch.float64)[best.cpu()]
            with torch.no_grad():
                for li, layer in enumerate(self.spec.layers):
                    cand = self._candidates[t][layer.name]                                 # [K, S, C]
                    w = cand[best[li].to(cand.device), torch.arange(steps, device=cand.device)]  # [S, C]
                    param = bank.weight[layer_key(layer.name)]
                    param.copy_(as_bank_weight(w, task.kind))
                    for si, step in enumerate(self.spec.steps):
                        base = {"split": "val", "task": t, "layer": layer.name, "step": step,
                                "timestep": self.spec.timesteps[si]}
                        for mi, m in enumerate(task.metrics):
                            rows.append({**base, "metric": m, "value": float(vals[mi, best[li, si], li, si])})
                        rows.append({**base, "metric": "ridge_lambda", "value": float(self.chosen_lambda[t][li, si])})
        self.results["val"] = rows
        self.log_dict({f"val/{r['task']}/{r['metric']}/{r['layer']}/step_{r['step']:02d}": r["value"] for r in rows},
                      rank_zero_only=True)
