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

**Gain over position.** The same pass also keeps, per layer, the per-position sums of the
activations and, per task, the per-pixel sums of the labels: the sufficient statistics of a ridge
probe fitted on top of the prior map (the prior as a fixed offset, :mod:`probes.metrics.prior_ridge`).
Those activation+prior heads get their own λ on validation (by the headline metric, scored at pixel
level since the prior varies within a token's block; binary heads are thresholded where the prior is,
at its validation-picked threshold) and report ``score(activations + prior) - score(prior)``.

After the pass, each layer's Gram matrices are eigendecomposed once and ``W(λ)`` is formed for
every λ of the grid (λ relative to the mean eigenvalue, so one grid fits every layer). Validation
scores every λ of every head; each head keeps the λ with the best validation headline metric.
Fitting stops after the first epoch (whatever ``max_epochs`` says). Works on streamed batches (``data.mode: streaming``) and on cached ones alike; sums are
all-reduced across ranks, so DDP gives the same probes as one process.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from probes.metrics.exact import BlockTargets, HeadMetrics, block_mean
from probes.metrics.offset_heads import OffsetTargets, offset_head_scores, offset_pearson
from probes.metrics.prior_map import PRIOR, baselines_from_mean
from probes.metrics.prior_ridge import solve_prior_ridge
from probes.tasks import LOWER_IS_BETTER, Task, get_task
from probes.training.heads import layer_key
from probes.training.module import ProbeModule, check_binary_fraction
from probes.training.per_image import all_ranks

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
    :param gain: also fit every head on top of the prior map, from the same pass (module docstring).
    """

    binary_fit_loss = "squared"      # least squares on 2f - 1
    gain_before_fit = False          # the prior map is accumulated in the pass itself
    #: whether the probes get a bias (subclasses fitting an offset set it)
    probe_bias = False
    #: whether fitting picks something (λ) on the validation split, so that it needs one
    selects_lambda = True

    def __init__(self, tasks: list[str] | None = None, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
                 threshold: float = 0.0, gain: bool = True) -> None:
        super().__init__(tasks=tasks, lr=None, bias=self.probe_bias, threshold=threshold, selection="last", gain=gain)
        self.save_hyperparameters()
        self.hparams.update(lr=None, bias=self.probe_bias, huber_delta=1.0, selection="last")  # the base class reads these
        self.automatic_optimization = False
        self._sums: dict[str, Tensor] = {}
        self._candidates: dict[str, dict[str, Tensor]] = {}
        self.chosen_lambda: dict[str, Tensor] = {}
        #: activation+prior candidates per task and layer: weights ``[K, S, C]``, the prior's weights ``[K, S]``,
        #: and the train mean maps (target space)
        self._gain_candidates: dict[str, dict[str, Tensor]] = {}
        self._gain_scales: dict[str, dict[str, Tensor]] = {}
        self._means: dict[str, np.ndarray] = {}
        self.chosen_gain_lambda: dict[str, Tensor] = {}
        #: validation outputs of every activation+prior candidate and the validation targets, kept until the
        #: end of validation: a binary head is cut at the prior's threshold, picked on *all* validation masks
        self._val_stash: dict[str, dict[str, list[Tensor]]] = {}
        self._val_targets: dict[str, list[Tensor]] = {}

    @property
    def fits_gain(self) -> bool:
        return bool(self.hparams.get("gain", False)) and bool(self.gain_banks)

    def build(self, spec) -> None:
        super().build(spec)
        heads = len(spec.layers) * len(spec.steps) * len(self.hparams.lambdas)
        self.ridge_val = torch.nn.ModuleDict({t: HeadMetrics(list(get_task(t).metrics), heads) for t in self.banks})

    def gain_metric_names(self, task: Task) -> list[str]:
        return list(task.metrics)       # nothing is selected by a loss: no loss column

    def _gain_loss(self, task, g, y, grid, offset, residual_blocks):
        return None                     # fitted in closed form: no loss at test

    def gain_offset(self, task: Task) -> Tensor:
        """Regression: the prior in z-units. Binary: the prior's positive frequency minus its validation
        threshold; the bank holds ``w/2`` (the ``2f - 1`` fit halved, in frequency units), so a head is
        positive where ``x w/2 + a (P - τ) > 0``: with ``w = 0`` exactly where the prior is."""
        prior = self.position[task.name][PRIOR]
        m = torch.from_numpy(np.asarray(prior.map, dtype=np.float64))
        if task.kind != "binary":
            return m
        return m - (prior.threshold if prior.threshold != float("-inf") else -1.0)   # -inf: every pixel positive

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
                if self.fits_gain:
                    self._add(f"sumxpos/{layer.name}", x.sum(0))                          # [S, T, C]
                finite[("*", layer.name)] = torch.isfinite(sx).all(-1)   # a sum is finite iff its terms are
            for t in self.banks:
                task = get_task(t)
                raw = labels[t].to(torch.float64)
                ok = torch.isfinite(raw).all()      # a NaN label is never > threshold: check before binarising
                for layer in self.spec.layers:
                    finite[(t, layer.name)] = ok.expand(len(self.spec.steps))
                y = (raw > self.hparams.threshold).to(torch.float64) if task.kind == "binary" else raw
                if self.fits_gain:
                    self._add(f"ypix/{t}", y.sum(0))                                       # [H, W]
                    self._add(f"nimages/{t}", torch.tensor(float(y.shape[0]), device=y.device))
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

    # -- activation+prior heads: λ per head on validation ----------------------------------
    def _select_gain(self, rows: list[dict[str, Any]]) -> None:
        """Fit the position baselines (binary thresholds on all validation masks), pick every activation+prior
        head's λ on validation, write the gain banks, and add the chosen heads' validation scores to ``rows``
        (column ``with_prior``).

        λ is picked by Dice for binary heads (cut at the prior's threshold) and by Pearson for regression
        heads: exact at pixel level from block statistics, where Spearman would rank every pixel of every
        candidate; the chosen heads are then scored with every metric, Spearman included.
        """
        steps, nl, k = len(self.spec.steps), len(self.spec.layers), len(self.hparams.lambdas)
        lambdas = torch.tensor(self.hparams.lambdas, dtype=torch.float64)
        index = {(r["task"], r["layer"], r["step"], r["metric"]): r for r in rows}
        for t, bank in self.gain_banks.items():
            task = get_task(t)
            parts = self._val_targets.pop(t, [])
            y = torch.cat(parts) if parts else torch.zeros(0, *self.spec.label_size)
            if task.kind == "binary":
                masks = torch.cat([m for m in all_ranks(y > 0.5) if len(m)])
                self.position[t] = baselines_from_mean(self._means[t], masks.numpy(), binary=True)
            else:
                self.position[t] = baselines_from_mean(self._means[t], None, binary=False)
            offset = self.gain_offset(task)
            chosen = torch.zeros(nl, steps, dtype=torch.long)
            for li, layer in enumerate(self.spec.layers):
                grid = tuple(layer.grid)
                stash = self._val_stash.get(t, {}).get(layer.name, [])
                q = torch.cat(stash) if stash else torch.zeros(0, k, steps, layer.grid[0] * layer.grid[1])
                flat = q.reshape(q.shape[0], k * steps, -1)
                a = self._gain_scales[t][layer.name].cpu()                                  # [K, S]
                if task.kind == "binary":
                    sel = offset_head_scores(task, flat, grid, offset, y, a.reshape(-1))[..., 0]
                else:
                    sel = offset_pearson(flat, OffsetTargets.build(y, grid, offset), a.reshape(-1))
                best = self._reduce_mean(sel, len(y)).reshape(k, steps).nan_to_num(nan=float("-inf")).argmax(0)
                chosen[li] = best
                pick = (best, torch.arange(steps))
                heads = q[:, pick[0], pick[1]]                                              # [N, S, T]
                full = self._reduce_mean(offset_head_scores(task, heads, grid, offset, y, a[pick]), len(y))  # [S, M]
                w = self._gain_candidates[t][layer.name]
                with torch.no_grad():
                    bank.weight[layer_key(layer.name)].copy_(w[best.to(w.device), torch.arange(steps, device=w.device)]
                                                             .unsqueeze(-1))
                    bank.prior_weight[layer_key(layer.name)].copy_(a[pick])
                for si, step in enumerate(self.spec.steps):
                    for mi, m in enumerate(task.metrics):
                        index[(t, layer.name, step, m)]["with_prior"] = float(full[si, mi])
                    index[(t, layer.name, step, "ridge_lambda")]["with_prior"] = float(lambdas[best[si]])
            self.chosen_gain_lambda[t] = lambdas[chosen]
        self._val_stash.clear()
        self.gain_active = True

    def _reduce_mean(self, values: Tensor, n: int) -> Tensor:
        """Mean over the images of every rank of per-image ``values [n, ...]``."""
        total = self.trainer.strategy.reduce(values.to(torch.float64).sum(0).to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(torch.tensor(float(n), dtype=torch.float64, device=self.device),
                                             reduce_op="sum")
        return (total / count.clamp_min(1)).cpu()

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
        if self.fits_gain:
            self._solve_gain(sums, lambdas)
        self._sums.clear()

    def _solve_gain(self, sums: dict[str, Tensor], lambdas: Tensor) -> None:
        """Every head on top of the prior map, for every λ, from the pass's sums: the prior is an extra,
        unpenalised input with its own weight (``mode="input"``), so a head is never worse on train than
        the prior alone nor than the activations alone."""
        for t in self.banks:
            task = get_task(t)
            n = int(round(float(sums[f"nimages/{t}"])))
            if task.kind == "binary":
                shift, scale = 0.5, 0.5                                  # z = 2f - 1
            else:
                st = self.spec.target_stats[t]
                shift, scale = st["mean"], st["std"]
            for layer in self.spec.layers:
                sol = solve_prior_ridge(sums[f"gram/{layer.name}"], sums[f"sumxpos/{layer.name}"],
                                        sums[f"xy/{t}/{layer.name}"], sums[f"ypix/{t}"], n, tuple(layer.grid),
                                        tuple(float(v) for v in lambdas), "input", shift=shift, scale=scale)
                w = sol.w / 2 if task.kind == "binary" else sol.w                  # binary: frequency units
                self._gain_candidates.setdefault(t, {})[layer.name] = w.to(torch.float32)
                self._gain_scales.setdefault(t, {})[layer.name] = sol.prior_coef.to(torch.float32)   # [K, S]
            mean = sums[f"ypix/{t}"] / n
            self._means[t] = (mean if task.kind == "binary" else (mean - shift) / scale).cpu().numpy()

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
                if self._gain_candidates:
                    q = torch.einsum("bstc,ksc->bkst", acts[layer.name].to(torch.float32),
                                     self._gain_candidates[t][layer.name])
                    self._val_stash.setdefault(t, {}).setdefault(layer.name, []).append(q.cpu())
            if self._gain_candidates:
                self._val_targets.setdefault(t, []).append(y.cpu())
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
        if self._gain_candidates:
            self._select_gain(rows)
        self.results["val"] = rows
        self.log_scores({f"val/{r['task']}/{r['metric']}/{r['layer']}/step_{r['step']:02d}": r["value"] for r in rows})
