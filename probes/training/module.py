"""The LightningModule: all (step, layer) probes of every task, trained in one pass over the data.

Like DINOv2's linear evaluation, each batch feeds every head and the losses are summed, so one
epoch trains all 240 probes of a task (or 720 for three tasks) at the cost of reading the data
once. Heads are keyed by (task, layer, step); metrics are per image, averaged over images, and
logged as ``<split>/<task>/<metric>/<layer>/step_<k>`` so W&B can compare steps and layers.

The probes' shapes come from the data (``datamodule.probe_spec``), so the module is built in
``setup`` rather than ``__init__``; a module restored from an export carries its own spec.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch import Tensor

from probes.contract import ProbeSpec
from probes.metrics.exact import BlockTargets, HeadMetrics, task_scores
from probes.metrics.image_scores import aligned_depth_metrics
from probes.metrics.offset_heads import offset_head_scores
from probes.metrics.prior_map import PRIOR, PositionBaseline
from probes.tasks import Task, better, get_task
from probes.training.finite import NonFiniteError, non_finite_heads, raise_non_finite
from probes.training.heads import (
    GainBank,
    ProbeBank,
    SortedBlocks,
    binary_loss,
    layer_key,
    offset_binary_loss,
    offset_regression_loss,
    regression_loss,
    upsample_tokens,
)
from probes.training.per_image import PerImage, PerImageParts, gather_per_image
from probes.training.position import fit_position

SELECTIONS = ("last", "best_val")
#: the aligned depth metrics kept per image for the best heads (``probes.metrics.image_scores.AlignedDepth``)
ALIGNED = ("abs_rel", "rmse", "delta1")


def logit_clamp(n_train: int) -> float:
    """The clamp of a positive-pixel frequency before its logit: below half of ``1/N``, so that the
    frequencies ``k/N`` of ``N`` train images keep their order (and their order against the cut)."""
    return 0.5 / (n_train + 1)


def check_binary_fraction(task: str, threshold: float, positive_any: int, all_positive: int, n: int,
                          values: tuple[float, float] | None, where: str) -> None:
    """Refuse binary labels with no positive (or no negative) pixel in any of the ``n`` train samples.

    :param positive_any: train samples with at least one pixel above ``threshold``.
    :param all_positive: train samples with every pixel above it.
    :param values: the smallest and largest label value, when known (for the message).
    """
    if n == 0:
        return
    state = "empty" if positive_any == 0 else "full" if all_positive == n else None
    if state is None:
        return
    rule = f"no pixel > threshold {threshold}" if state == "empty" else f"every pixel > threshold {threshold}"
    if values is not None:
        rule += f"; label values {values[0]:g}..{values[1]:g}"
    raise ValueError(
        f"task {task!r}: all {n} train labels are {state} ({rule}) in "
        f"{where}. There is nothing to learn, and an {state} mask makes Dice meaningless (an empty prediction of an "
        f"empty mask scores 1.000). Check the labeler's output (data.labels.{task}); with the 'files' labeler, the "
        f"masks' values and channel (data.labels.{task}.channel); or set model.init_args.threshold.")


class ProbeModule(pl.LightningModule):
    """Linear probes on captured activations.

    :param tasks: tasks to probe; default: every task the data has labels for.
    :param lr: learning rate per task (default: the protocol's, 1e-3; shading 1e-2), or one for all.
    :param bias: give each probe a bias (the reference has none).
    :param huber_delta: Huber loss threshold for regression tasks, in target z-units.
    :param threshold: a binary task's label is positive where ``label > threshold`` (reference: 0
        on TRACER's uint8 map).
    :param selection: ``last`` (weights of the final epoch, as the reference reports) or
        ``best_val`` (each head keeps its weights from the epoch of its lowest validation loss).
        Never the test set.
    :param gain: also fit every head on top of the prior map (the gain over position:
        ``score(activations + prior) - score(prior)``, the ``with_prior`` and ``gain`` columns of
        ``metrics.csv``). Such a head predicts ``up(x w) + a P``, the prior ``P`` (from a labels-only
        pass over train) entering as an extra input with its own weight ``a`` (initialised to 1): the
        z-scored prior for regression (Huber loss at pixel level), the prior's logit minus its
        threshold's for binary tasks (cross-entropy, positive where the sum is > 0, so that ``w = 0``
        is the prior thresholded where the prior is).
    """

    #: trains in a single pass (closed form), so it can consume streamed, uncached data
    one_pass = False
    #: the loss binary probes are fitted with (exports record it: an edit uses the same loss)
    binary_fit_loss = "cross_entropy"

    def __init__(self, tasks: list[str] | None = None, lr: dict[str, float] | float | None = None,
                 bias: bool = False, huber_delta: float = 1.0, threshold: float = 0.0,
                 selection: str = "last", gain: bool = True) -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"model.selection must be one of {SELECTIONS}, got {selection!r}")
        for t in tasks or []:
            get_task(t)
        self.save_hyperparameters()
        self.spec: ProbeSpec | None = None
        self.banks = nn.ModuleDict()
        self.results: dict[str, list[dict[str, Any]]] = {}
        self._best: dict[str, dict[str, Tensor]] = {}
        self._best_loss: dict[str, Tensor] = {}
        #: the weights were read from an export (``probes.export.rebuild``), not fitted in this process
        self.restored = False
        #: per task, the position baselines ``{"prior", "plane"}`` in target space (fitted on train,
        #: thresholds on val): the reference of the gain heads and of the ``prior``/``plane`` rows
        self.position: dict[str, dict[str, PositionBaseline]] = {}
        #: the activation+prior heads are fitted (SGD: from the start of fitting; ridge: after the solve)
        self.gain_active = False
        self.logit_eps = 0.5
        self.gain_banks = nn.ModuleDict()
        #: per-image test scores, gathered at the end of testing (``probes.training.per_image``)
        self.per_image: PerImage | None = None
        self._parts = PerImageParts()
        #: the test heads the aligned depth metrics are computed for: task -> {column: (layer, step)}
        self._aligned_heads: dict[str, dict[str, tuple[str, int]]] = {}

    # -- construction ----------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.banks)

    def build(self, spec: ProbeSpec) -> None:
        tasks = list(self.hparams.tasks or spec.tasks)
        missing = [t for t in tasks if t not in spec.tasks]
        if missing:
            raise ValueError(f"tasks {missing} have no labels in the data; data.labels has {spec.tasks}")
        self.spec = spec
        steps, heads = len(spec.steps), len(spec.layers) * len(spec.steps)
        for t in tasks:
            task = get_task(t)
            self.banks[t] = ProbeBank(spec.layers, steps, task.out_dim, bias=self.hparams.bias)
        self.metrics = nn.ModuleDict({
            split: nn.ModuleDict({t: HeadMetrics([*get_task(t).metrics, "loss"], heads) for t in tasks})
            for split in ("val", "test")})
        if self.hparams.get("gain", False):
            for t in tasks:
                self.gain_banks[t] = GainBank(spec.layers, steps, bias=self.hparams.bias)
            self.gain_metrics = nn.ModuleDict({
                split: nn.ModuleDict({t: HeadMetrics(self.gain_metric_names(get_task(t)), heads) for t in tasks})
                for split in ("val", "test")})

    def gain_metric_names(self, task: Task) -> list[str]:
        """What the activation+prior heads report: the task's metrics, and the loss SGD heads are
        selected by (``selection: best_val``)."""
        return [*task.metrics, "loss"]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        spec = getattr(dm, "probe_spec", None)
        if spec is None:
            raise RuntimeError("ProbeModule needs a datamodule with a probe_spec (data.ActivationDataModule)")
        if spec.streaming and not self.one_pass and stage == "fit":
            raise ValueError("SGD probes need several epochs over cached activations; data.mode=streaming caches "
                             "nothing. Use data.mode=cached, or the one-pass probes: "
                             "model.class_path=probes.training.ridge.RidgeProbeModule")
        if self.one_pass and self.trainer.world_size > 1 and not getattr(dm, "exact_train_shards", False):
            raise ValueError("one-pass probes must see each training image exactly once: set "
                             "data.exact_train_shards=true (the CLI links it from the model)")
        if self.spec is None:
            self.build(spec)
        else:
            self._check_compatible(spec)
        if stage == "fit":
            self._check_binary_labels(dm)
            if self.hparams.get("gain", False) and self.gain_before_fit and not self.gain_active:
                # the labels-only pass over train (and the thresholds on val): the offsets of the gain heads
                self.position = fit_position(self.targets, dm, list(self.banks))
                self.logit_eps = logit_clamp(len(dm.datasets["train"]))
                self.gain_active = True

    #: the gain heads need the prior map before fitting (SGD); one-pass probes accumulate it in their pass
    gain_before_fit = True

    def ensure_position(self, dm: Any) -> None:
        """Fit the position baselines of tasks that have none yet (an exported module being tested)."""
        todo = [t for t in self.banks if t not in self.position]
        if todo and dm is not None and getattr(dm, "label_caches", None):
            self.position.update(fit_position(self.targets, dm, todo))

    def gain_offset(self, task: Task) -> Tensor:
        """The ``[H, W]`` map ``task``'s activation+prior heads add (with each head's weight ``a``).

        Regression: the prior map in z-units. Binary (SGD, cross-entropy on logits): the logit of the
        prior's positive frequency minus the logit of its validation threshold, so that a head with
        ``w = 0`` is positive exactly where the prior is above its threshold (frequencies are clamped
        to ``[eps, 1 - eps]``, ``eps`` below half of ``1/N``: the clamp keeps their order).
        """
        prior = self.position[task.name][PRIOR]
        m = torch.from_numpy(np.asarray(prior.map, dtype=np.float64))
        if task.kind != "binary":
            return m
        eps, tau = self.logit_eps, prior.threshold
        cut = math.log(eps / 2 / (1 - eps / 2)) if tau == float("-inf") else math.log(
            min(max(tau, eps), 1 - eps) / (1 - min(max(tau, eps), 1 - eps)))   # -inf: every pixel positive
        return torch.logit(m.clamp(eps, 1 - eps)) - cut

    def _check_binary_labels(self, dm: Any) -> None:
        """Refuse a binary task whose train labels are all empty (or all full) under ``threshold``.

        With no positive (or no negative) pixel there is nothing to learn, and an empty prediction
        of an empty mask scores a "perfect" Dice of 1.000: the report would look excellent.
        Uses the per-sample label ranges the data module measured (cached mode; one-pass probes
        also check what they accumulate, for streamed data).
        """
        ranges = getattr(dm, "label_ranges", None) or {}
        train = getattr(dm, "datasets", {}).get("train")
        if train is None:
            return
        idx = list(train.indices)
        for t in self.banks:
            if get_task(t).kind != "binary" or t not in ranges:
                continue
            lo, hi = (ranges[t][0][idx], ranges[t][1][idx])
            path = getattr(getattr(dm, "label_caches", {}).get(t), "path", "the label cache")
            check_binary_fraction(t, self.hparams.threshold, positive_any=int((hi > self.hparams.threshold).sum()),
                                  all_positive=int((lo > self.hparams.threshold).sum()), n=len(idx),
                                  values=(float(lo.min()), float(hi.max())), where=str(path))

    def _check_compatible(self, data: ProbeSpec) -> None:
        """A module restored from an export must see the activations it was trained on."""
        mine = {l.name: l for l in self.spec.layers}
        theirs = {l.name: l for l in data.layers}
        bad = [n for n in mine if n not in theirs or (theirs[n].channels, theirs[n].grid) != (mine[n].channels, mine[n].grid)]
        if bad or self.spec.steps != data.steps:
            raise ValueError(f"these probes expect layers {list(mine)} (steps {self.spec.steps}); the data has "
                             f"{list(theirs)} (steps {data.steps}); mismatched layers: {bad}")
        if tuple(self.spec.label_size) != tuple(data.label_size):
            raise ValueError(f"probes trained for labels {self.spec.label_size}, data has {data.label_size}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = self.hparams.lr
        groups = []
        for t, bank in self.banks.items():
            task_lr = lr.get(t, get_task(t).lr) if isinstance(lr, dict) else (lr or get_task(t).lr)
            params = list(bank.parameters()) + (list(self.gain_banks[t].parameters()) if t in self.gain_banks else [])
            groups.append({"params": params, "lr": task_lr, "name": t})
        return torch.optim.Adam(groups)

    # -- targets and forward ---------------------------------------------------------------
    def targets(self, task: Task, raw: Tensor) -> Tensor:
        """Binary: ``raw > threshold``. Regression: z-scored with the train split's statistics."""
        if task.kind == "binary":
            return (raw > self.hparams.threshold).to(torch.float32)
        stats = self.spec.target_stats[task.name]
        return (raw.to(torch.float32) - stats["mean"]) / stats["std"]

    def _run(self, batch: dict[str, Any], split: str) -> Tensor:
        acts, labels = batch["acts"], batch["labels"]
        total = torch.zeros((), device=self.device)
        per_head: dict[tuple[str, str], Tensor] = {}      # (task, layer) -> per-image, per-step losses
        steps = len(self.spec.steps)
        xs = {l.name: acts[l.name].to(torch.float32) for l in self.spec.layers}
        gain = self.gain_active and bool(self.gain_banks)
        keep = split == "test"
        if keep:
            self._parts.add_index(batch["index"])
        for t, bank in self.banks.items():
            task = get_task(t)
            m = len(task.metrics)
            y = self.targets(task, labels[t])
            blocks: dict[tuple[int, int], BlockTargets] = {}     # block statistics, shared by all heads
            sorted_blocks: dict[tuple[int, int], SortedBlocks] = {}
            task_loss = torch.zeros((), device=self.device)
            gain_loss_sum = torch.zeros((), device=self.device)
            offset = self.gain_offset(task).to(self.device) if gain else None
            kept: list[Tensor] = []
            kept_gain: list[Tensor] = []
            outs: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
            for li, layer in enumerate(self.spec.layers):
                grid = tuple(layer.grid)
                out = bank.forward_layer(layer.name, xs[layer.name])            # [B, S, T, out]
                need_blocks = task.kind == "binary" or split != "train"
                if need_blocks and grid not in blocks:
                    blocks[grid] = BlockTargets.build(y, grid, ranks=task.kind != "binary" and split != "train")
                if task.kind == "binary":
                    loss_img = binary_loss(out, blocks[grid].mean)                # [B, S]
                else:
                    if grid not in sorted_blocks:
                        sorted_blocks[grid] = SortedBlocks(y, grid)
                    loss_img = regression_loss(out[..., 0], y, grid, self.hparams.huber_delta, sorted_blocks[grid])
                task_loss = task_loss + loss_img.mean(0).sum()
                head_loss = loss_img.detach()
                if split != "train":
                    with torch.no_grad():
                        vals = self._metric_values(task, out.detach(), blocks[grid])
                        if keep:
                            kept.append(vals[..., :m])
                        vals = torch.cat([vals, loss_img.detach().to(vals.dtype).unsqueeze(-1)], -1)
                        self.metrics[split][t].update(vals, slice(li * steps, (li + 1) * steps))
                g = None
                if gain:
                    g = self.gain_banks[t].forward_layer(layer.name, xs[layer.name])[..., 0]     # [B, S, T]
                    a = self.gain_banks[t].scale(layer.name)                                    # [S]
                    gl = self._gain_loss(task, g, a, y, grid, offset)
                    if gl is not None:
                        gain_loss_sum = gain_loss_sum + gl.mean(0).sum()
                        head_loss = head_loss + gl.detach()
                    if split != "train":
                        with torch.no_grad():
                            gv = offset_head_scores(task, g.detach(), grid, offset, y, a.detach()).to(torch.float64)
                            if keep:
                                kept_gain.append(gv)
                            if gl is not None:
                                gv = torch.cat([gv, gl.detach().to(gv.dtype).unsqueeze(-1)], -1)
                            self.gain_metrics[split][t].update(gv, slice(li * steps, (li + 1) * steps))
                if keep and layer.name in {h[0] for h in self._aligned_heads.get(t, {}).values()}:
                    outs[layer.name] = (out.detach()[..., 0], None if g is None else (g.detach(), a.detach()))
                per_head[(t, layer.name)] = head_loss
            if keep:
                self._parts.add(f"{t}/probe", torch.stack(kept, 1))                         # [B, L, S, M]
                if kept_gain:
                    self._parts.add(f"{t}/with_prior", torch.stack(kept_gain, 1))
                self._keep_aligned(t, labels[t], outs, offset)
            mean_loss = task_loss / (steps * len(self.spec.layers))
            self.log(f"{split}/{t}/loss", mean_loss, on_step=split == "train", on_epoch=True,
                     batch_size=len(batch["index"]), sync_dist=split != "train")
            if split == "train":  # the progress bar: one short entry per task (loggers get the full key above)
                self.log(t, mean_loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False,
                         batch_size=len(batch["index"]))
            if gain and split == "train":
                self.log(f"{split}/{t}/gain_loss", gain_loss_sum / (steps * len(self.spec.layers)), on_step=True,
                         on_epoch=True, batch_size=len(batch["index"]))
            total = total + task_loss + gain_loss_sum
        if not bool(torch.isfinite(total)):   # one check per batch; the losses are >= 0, so any NaN/inf shows here
            self._non_finite("loss", split, batch, non_finite_heads(per_head, self.spec.steps))
        return total

    def _gain_loss(self, task: Task, g: Tensor, a: Tensor, y: Tensor, grid: tuple[int, int],
                   offset: Tensor) -> Tensor | None:
        """Per-image loss ``[B, S]`` of SGD activation+prior heads ``up(g) + a P`` (``g [B, S, T]``): Huber
        (regression) or cross-entropy on logits (binary), at pixel level since ``P`` varies within a block."""
        if task.kind == "binary":
            return offset_binary_loss(g, grid, offset.to(g.dtype), a, y)
        return offset_regression_loss(g, grid, offset.to(g.dtype), a, y, self.hparams.huber_delta)

    def _keep_aligned(self, t: str, raw: Tensor, outs: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]],
                      offset: Tensor | None) -> None:
        """Per-image aligned depth metrics of the heads picked for them (``on_test_start``)."""
        heads, space = self._aligned_heads.get(t, {}), self.spec.label_spaces.get(t)
        if not heads or space is None:
            return
        label = raw.detach().cpu().to(torch.float64).numpy()
        size = tuple(self.spec.label_size)
        for what, (layer, step) in heads.items():
            info = next(l for l in self.spec.layers if l.name == layer)
            si = list(self.spec.steps).index(step)
            probe, gain_out = outs[layer]
            if what == "with_prior" and gain_out is None:
                continue
            q = probe[:, si] if what == "probe" else gain_out[0][:, si]
            pred = upsample_tokens(q.to(torch.float64).cpu(), tuple(info.grid), size)
            if what == "with_prior":
                pred = pred + float(gain_out[1][si]) * offset.cpu().to(torch.float64)
            a = aligned_depth_metrics(pred.numpy(), label, space=space)
            self._parts.add(f"{t}/aligned/{what}", np.stack([a.abs_rel, a.rmse, a.delta1], -1))

    def _non_finite(self, what: str, split: str, batch: dict[str, Any], heads: list[tuple[str, str, int]]) -> None:
        """Stop the run, naming the heads and the samples (and files) the non-finite values come from."""
        lr = self.hparams.lr
        hint = ("Lower the learning rate of these tasks (model.init_args.lr, now "
                f"{lr if lr is not None else 'the protocol default'}).") if not self.one_pass else \
            "Raise the smallest ridge strength (model.init_args.lambdas)."
        if self.restored:   # not fitted here: no training setting of this run made them
            hint = ("These probes were read from an export, not trained in this run: its weights give non-finite "
                    "outputs on finite inputs (overflow); retrain them, or evaluate another export.")
        raise_non_finite(what, split, heads, batch, [l.name for l in self.spec.layers], list(self.banks),
                         list(self.spec.steps), getattr(self._trainer, "datamodule", None), hint)

    @staticmethod
    def _metric_values(task: Task, out: Tensor, blocks: BlockTargets) -> Tensor:
        """Per-image values ``[B, S, M]`` of the task's metrics, in ``task.metrics`` order."""
        return task_scores(task, out[..., 1] > out[..., 0] if task.kind == "binary" else out[..., 0], blocks)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._run(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._run(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._run(batch, "test")

    # -- epoch ends: metrics, logging, selection ------------------------------------------
    def _collect(self, split: str) -> list[dict[str, Any]]:
        rows, logged = [], {}
        steps = len(self.spec.steps)
        for t in self.banks:
            values = self._compute(self.metrics[split][t], t, split)
            names = self.metrics[split][t].metric_names
            gain = self._gain_values(split, t)
            for mi, name in enumerate(names):
                for li, layer in enumerate(self.spec.layers):
                    for si, step in enumerate(self.spec.steps):
                        v = float(values[mi, li * steps + si])
                        row = {"split": split, "task": t, "layer": layer.name, "step": step,
                               "timestep": self.spec.timesteps[si], "metric": name, "value": v}
                        if gain is not None and name in gain[1]:
                            row["with_prior"] = float(gain[0][gain[1].index(name), li * steps + si])
                        rows.append(row)
                        if name != "loss":
                            logged[f"{split}/{t}/{name}/{layer.name}/step_{step:02d}"] = v
        if logged and not self.trainer.sanity_checking:
            if split == "test":      # once per run, and what ``trainer.test`` returns: through Lightning
                self.log_dict(logged, rank_zero_only=True)  # values are already all-reduced
            else:                    # every validation epoch: straight to the loggers
                self.log_scores(logged)
        return rows

    def log_scores(self, scores: dict[str, float]) -> None:
        """Every head's validation scores, straight to the loggers (W&B's per-head curves). Through
        ``self.log_dict`` Lightning wraps each of these thousands of scalars in a result object and moves
        it between devices, at every epoch, which took longer than the ridge solve; the loggers' methods
        are rank-zero only. (The test scores, logged once, still go through Lightning: ``trainer.test``
        returns them.)"""
        for logger in self.loggers:
            logger.log_metrics(scores, step=self.global_step)

    def _compute(self, metric: HeadMetrics, t: str, split: str) -> Tensor:
        values = metric.compute().cpu()
        metric.reset()
        if not bool(torch.isfinite(values).all()):  # the batch checks make this unreachable; never report NaN
            steps = len(self.spec.steps)
            bad = torch.nonzero(~torch.isfinite(values)).tolist()
            names = [f"{metric.metric_names[m]} of layer {self.spec.layers[h // steps].name} step "
                     f"{self.spec.steps[h % steps]}" for m, h in bad[:3]]
            raise NonFiniteError(f"non-finite {split} metrics for task {t!r}: {', '.join(names)}"
                                 f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (did the {split} split "
                                 f"have no images?)")
        return values

    def _gain_values(self, split: str, t: str) -> tuple[Tensor, list[str]] | None:
        """The activation+prior heads' ``[M, heads]`` means on ``split`` and their metric names, if scored."""
        metrics = getattr(self, "gain_metrics", None)
        if metrics is None or t not in metrics[split]:
            return None
        metric = metrics[split][t]
        if not self.gain_active or not bool((metric.count > 0).all()):
            metric.reset()
            return None
        return self._compute(metric, t, split), list(metric.metric_names)

    def on_validation_epoch_end(self) -> None:
        rows = self._collect("val")
        if self.trainer.sanity_checking:
            return
        self.results["val"] = rows
        if self.hparams.selection == "best_val":
            self._track_best(rows)

    def on_test_epoch_end(self) -> None:
        self.results["test"] = self._collect("test")
        self.per_image = gather_per_image(self._parts, [l.name for l in self.spec.layers], list(self.spec.steps),
                                          {t: list(get_task(t).metrics) for t in self.banks},
                                          {"aligned_heads": {t: {k: list(v) for k, v in h.items()}
                                                             for t, h in self._aligned_heads.items()},
                                           "label_spaces": dict(self.spec.label_spaces)})
        self._parts = PerImageParts()

    def _track_best(self, rows: list[dict[str, Any]]) -> None:
        """Keep each head's weights (and, for the activation+prior heads, theirs) from its best val loss."""
        banks = [(t, t, bank, "value") for t, bank in self.banks.items()]
        if self.gain_active:
            banks += [(f"{t}+prior", t, bank, "with_prior") for t, bank in self.gain_banks.items()]
        for key, t, bank, column in banks:
            loss = torch.tensor([r.get(column, float("nan")) for r in rows if r["task"] == t and r["metric"] == "loss"])
            if not bool(torch.isfinite(loss).all()):
                continue
            self._keep_best(key, bank, loss)

    def _keep_best(self, key: str, bank: ProbeBank, loss: Tensor) -> None:
        steps = len(self.spec.steps)
        best = self._best_loss.get(key)
        improved = torch.ones_like(loss, dtype=torch.bool) if best is None else loss < best
        self._best_loss[key] = loss if best is None else torch.where(improved, loss, best)
        store = self._best.setdefault(key, {})
        for li, layer in enumerate(self.spec.layers):
            mask = improved[li * steps:(li + 1) * steps].to(self.device)
            w = bank.weight[layer_key(layer.name)].detach()
            store[layer.name] = w.clone() if layer.name not in store else torch.where(mask[:, None, None], w, store[layer.name])
            if bank.bias is not None:
                b = bank.bias[layer_key(layer.name)].detach()
                bkey = layer.name + "/bias"
                store[bkey] = b.clone() if bkey not in store else torch.where(mask[:, None], b, store[bkey])
            if isinstance(bank, GainBank):
                a = bank.scale(layer.name).detach()
                akey = layer.name + "/prior_weight"
                store[akey] = a.clone() if akey not in store else torch.where(mask, a, store[akey])

    def on_test_start(self) -> None:
        """With ``selection: best_val``, test (and export) each head's weights from its best val epoch; fit
        the position baselines if none are fitted yet; pick the heads aligned depth metrics are kept for."""
        self._parts = PerImageParts()
        dm = getattr(self.trainer, "datamodule", None)
        self.ensure_position(dm)
        self._aligned_heads = self.pick_aligned_heads()
        if self.hparams.selection != "best_val" or not self._best:
            return
        with torch.no_grad():
            for key, bank in [*self.banks.items(), *[(f"{t}+prior", b) for t, b in self.gain_banks.items()]]:
                if key not in self._best:
                    continue
                for layer in self.spec.layers:
                    bank.weight[layer_key(layer.name)].copy_(self._best[key][layer.name])
                    if bank.bias is not None:
                        bank.bias[layer_key(layer.name)].copy_(self._best[key][layer.name + "/bias"])
                    if isinstance(bank, GainBank):
                        bank.prior_weight[layer_key(layer.name)].copy_(self._best[key][layer.name + "/prior_weight"])

    def pick_aligned_heads(self) -> dict[str, dict[str, tuple[str, int]]]:
        """Per task whose labels have a depth space: the probe head and the activation+prior head best on
        validation by the task's headline metric (the heads the report shows), for the aligned depth metrics."""
        out: dict[str, dict[str, tuple[str, int]]] = {}
        val = self.results.get("val", [])
        for t in self.banks:
            if self.spec.label_spaces.get(t) is None:
                continue
            metric = get_task(t).primary
            heads = {}
            for what, column in (("probe", "value"), ("with_prior", "with_prior")):
                best = None
                for r in val:
                    if r["task"] != t or r["metric"] != metric or column not in r:
                        continue
                    if best is None or better(metric, r[column], best[column]):
                        best = r
                if best is not None:
                    heads[what] = (best["layer"], int(best["step"]))
            if heads:
                out[t] = heads
        return out

    # -- checkpoints carry the spec, so a checkpoint can be restored without the data --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["probe_spec"] = self.spec.to_dict() if self.spec else None
        checkpoint["position"] = {t: {n: {"map": b.map, "threshold": b.threshold, "val_score": b.val_score}
                                      for n, b in bs.items()} for t, bs in self.position.items()}
        checkpoint["gain_active"], checkpoint["logit_eps"] = self.gain_active, self.logit_eps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("probe_spec") and self.spec is None:
            self.build(ProbeSpec.from_dict(checkpoint["probe_spec"]))
        self.position = {t: {n: PositionBaseline(n, np.asarray(b["map"]), b["threshold"], b["val_score"])
                             for n, b in bs.items()} for t, bs in (checkpoint.get("position") or {}).items()}
        self.gain_active = bool(checkpoint.get("gain_active", False)) and bool(self.position)
        self.logit_eps = float(checkpoint.get("logit_eps", self.logit_eps))
