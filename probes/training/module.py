"""The LightningModule: all (step, layer) probes of every task, trained in one pass over the data.

Like DINOv2's linear evaluation, each batch feeds every head and the losses are summed, so one
epoch trains all 240 probes of a task (or 720 for three tasks) at the cost of reading the data
once. Heads are keyed by (task, layer, step); metrics are per image, averaged over images, and
logged as ``<split>/<task>/<metric>/<layer>/step_<k>`` so W&B can compare steps and layers.

The probes' shapes come from the data (``datamodule.probe_spec``), so the module is built in
``setup`` rather than ``__init__``; a module restored from an export carries its own spec.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch import Tensor

from probes.contract import ProbeSpec
from probes.metrics.exact import BlockTargets, HeadMetrics, task_scores
from probes.tasks import Task, get_task
from probes.training.finite import NonFiniteError, non_finite_heads, raise_non_finite
from probes.training.heads import ProbeBank, SortedBlocks, binary_loss, layer_key, regression_loss

SELECTIONS = ("last", "best_val")


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
    """

    #: trains in a single pass (closed form), so it can consume streamed, uncached data
    one_pass = False
    #: the loss binary probes are fitted with (exports record it: an edit uses the same loss)
    binary_fit_loss = "cross_entropy"

    def __init__(self, tasks: list[str] | None = None, lr: dict[str, float] | float | None = None,
                 bias: bool = False, huber_delta: float = 1.0, threshold: float = 0.0,
                 selection: str = "last") -> None:
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
            groups.append({"params": list(bank.parameters()), "lr": task_lr, "name": t})
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
        for t, bank in self.banks.items():
            task = get_task(t)
            y = self.targets(task, labels[t])
            blocks: dict[tuple[int, int], BlockTargets] = {}     # block statistics, shared by all heads
            sorted_blocks: dict[tuple[int, int], SortedBlocks] = {}
            task_loss = torch.zeros((), device=self.device)
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
                per_head[(t, layer.name)] = loss_img.detach()
                task_loss = task_loss + loss_img.mean(0).sum()
                if split != "train":
                    with torch.no_grad():
                        vals = self._metric_values(task, out.detach(), blocks[grid])
                        vals = torch.cat([vals, loss_img.detach().to(vals.dtype).unsqueeze(-1)], -1)
                        self.metrics[split][t].update(vals, slice(li * steps, (li + 1) * steps))
            mean_loss = task_loss / (steps * len(self.spec.layers))
            self.log(f"{split}/{t}/loss", mean_loss, on_step=split == "train", on_epoch=True,
                     batch_size=len(batch["index"]), sync_dist=split != "train")
            if split == "train":  # the progress bar: one short entry per task (loggers get the full key above)
                self.log(t, mean_loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False,
                         batch_size=len(batch["index"]))
            total = total + task_loss
        if not bool(torch.isfinite(total)):   # one check per batch; the losses are >= 0, so any NaN/inf shows here
            self._non_finite("loss", split, batch, non_finite_heads(per_head, self.spec.steps))
        return total

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
            metric = self.metrics[split][t]
            values = metric.compute().cpu()
            metric.reset()
            if not bool(torch.isfinite(values).all()):  # the batch checks make this unreachable; never report NaN
                bad = torch.nonzero(~torch.isfinite(values)).tolist()
                names = [f"{metric.metric_names[m]} of layer {self.spec.layers[h // steps].name} step "
                         f"{self.spec.steps[h % steps]}" for m, h in bad[:3]]
                raise NonFiniteError(f"non-finite {split} metrics for task {t!r}: {', '.join(names)}"
                                     f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (did the {split} split "
                                     f"have no images?)")
            for mi, name in enumerate(metric.metric_names):
                for li, layer in enumerate(self.spec.layers):
                    for si, step in enumerate(self.spec.steps):
                        v = float(values[mi, li * steps + si])
                        rows.append({"split": split, "task": t, "layer": layer.name, "step": step,
                                     "timestep": self.spec.timesteps[si], "metric": name, "value": v})
                        if name != "loss":
                            logged[f"{split}/{t}/{name}/{layer.name}/step_{step:02d}"] = v
        if logged and not self.trainer.sanity_checking:
            self.log_dict(logged, rank_zero_only=True)  # values are already all-reduced
        return rows

    def on_validation_epoch_end(self) -> None:
        rows = self._collect("val")
        if self.trainer.sanity_checking:
            return
        self.results["val"] = rows
        if self.hparams.selection == "best_val":
            self._track_best(rows)

    def on_test_epoch_end(self) -> None:
        self.results["test"] = self._collect("test")

    def _track_best(self, rows: list[dict[str, Any]]) -> None:
        steps = len(self.spec.steps)
        for t, bank in self.banks.items():
            loss = torch.tensor([r["value"] for r in rows if r["task"] == t and r["metric"] == "loss"])
            best = self._best_loss.get(t)
            improved = torch.ones_like(loss, dtype=torch.bool) if best is None else loss < best
            self._best_loss[t] = loss if best is None else torch.where(improved, loss, best)
            store = self._best.setdefault(t, {})
            for li, layer in enumerate(self.spec.layers):
                mask = improved[li * steps:(li + 1) * steps].to(self.device)
                w = bank.weight[layer_key(layer.name)].detach()
                store[layer.name] = w.clone() if layer.name not in store else torch.where(mask[:, None, None], w, store[layer.name])
                if bank.bias is not None:
                    b = bank.bias[layer_key(layer.name)].detach()
                    key = layer.name + "/bias"
                    store[key] = b.clone() if key not in store else torch.where(mask[:, None], b, store[key])

    def on_test_start(self) -> None:
        """With ``selection: best_val``, test (and export) each head's weights from its best val epoch."""
        if self.hparams.selection != "best_val" or not self._best:
            return
        with torch.no_grad():
            for t, bank in self.banks.items():
                for layer in self.spec.layers:
                    bank.weight[layer_key(layer.name)].copy_(self._best[t][layer.name])
                    if bank.bias is not None:
                        bank.bias[layer_key(layer.name)].copy_(self._best[t][layer.name + "/bias"])

    # -- checkpoints carry the spec, so a checkpoint can be restored without the data --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["probe_spec"] = self.spec.to_dict() if self.spec else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("probe_spec") and self.spec is None:
            self.build(ProbeSpec.from_dict(checkpoint["probe_spec"]))
