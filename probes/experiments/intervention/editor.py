"""The activation editor: the intervention as an object that swaps a layer's output, not a new loop.

Like :class:`probes.generation.capture.ActivationCapture`, an :class:`ActivationEditor` puts one
forward hook on each selected layer's hooked module (``attn1.to_out.0`` of a U-Net, a block of a
diffusion transformer), is set and removed explicitly (a context manager), and learns the current
denoising step from the pipeline's step callback (:meth:`on_step_end`), so the stock diffusers
pipeline runs unchanged. Where capture hooks only read, the editor's hooks return a replacement
output at the planned (step, layer) pairs:

1. read the image tokens with the layer's readout rule (:mod:`probes.diffusion.readout`) and take
   their conditional half (the CFG batch is ``[uncond, cond]``; with FLUX's true CFG the
   conditional call is the step's first, without CFG the whole batch is conditional);
2. run Adam on that activation itself (lr 5e-3, 128 iterations by default) to minimise the
   exported probe's task loss against the counterfactual target (:mod:`.objective`);
3. write the optimised tokens back with the rule's inverse (a transformer block's text stream, or
   a single stream's text tokens, stay as they were) and return that output; the unconditional
   half is untouched.

Layers fire in forward order, so within a step each edit starts from activations that already
carry the edits of earlier layers. At every other (step, layer) the hook returns ``None``: the
module's own output flows on, bitwise unchanged, and zero iterations write back the very values
they read (both tested).

Gradients: the pipeline runs under ``no_grad`` (diffusers decorates ``__call__``) and maybe under
``inference_mode``/``autocast``; the optimisation runs inside ``enable_grad`` with inference mode
and autocast switched off, on a float32 copy of the activation, so it works under all of them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from probes.diffusion.families.spec import CFG_LAYOUTS
from probes.diffusion.hooks import ModuleHooks
from probes.diffusion.layers import LayerInfo, LayerRegistry
from probes.diffusion.readout import read_tokens, write_tokens
from probes.experiments.intervention.objective import BINARY_LOSSES, ProbeObjective
from probes.export.probeset import LinearProbe, ProbeSet

OPTIMIZERS = ("adam", "sgd", "projection")


@dataclass(frozen=True)
class EditSettings:
    """How each activation is optimised.

    :param iterations: Adam steps per edited (step, layer) (the reference's 128; 0 edits nothing).
    :param lr: Adam's learning rate (the reference's 5e-3).
    :param huber_delta: regression tasks' Huber threshold, in probe z-units (the protocol's 1).
    :param binary_loss: binary probes' edit loss, ``cross_entropy`` (the reference's) or ``squared``
        (see :mod:`.objective`); the run picks the loss the export's probes were fitted with.
    :param optimizer: ``adam`` (the reference's), ``sgd``, or ``projection``: the closed-form
        smallest edit after which the probe reads the squared-error optimum
        (:meth:`.objective.ProbeObjective.project`; ``iterations`` and ``lr`` are then unused,
        except that 0 iterations still edits nothing).
    """

    iterations: int = 128
    lr: float = 5e-3
    huber_delta: float = 1.0
    binary_loss: str = "cross_entropy"
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.lr <= 0:
            raise ValueError(f"edit iterations must be >= 0 and lr > 0, got iterations={self.iterations}, lr={self.lr}")
        if self.binary_loss not in BINARY_LOSSES:
            raise ValueError(f"edit binary_loss must be one of {BINARY_LOSSES}, got {self.binary_loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"edit optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "projection" and self.binary_loss != "squared":
            raise ValueError("the projection edit reaches the squared-error optimum, so its loss is the squared one: "
                             f"set binary_loss: squared (or auto), not {self.binary_loss!r}")


@dataclass
class EditRecord:
    """One performed edit: the probe loss per image before and after the optimisation."""

    step: int
    layer: str
    loss_before: list[float] = field(default_factory=list)
    loss_after: list[float] = field(default_factory=list)
    #: per image, how far the edit moved the tokens out of their distribution (a ratio of mean
    #: Mahalanobis distances, edited over unedited; empty where nothing measured it)
    shift: list[float] = field(default_factory=list)


def plan_edits(probes: ProbeSet, task: str, layers: str | Iterable[str], steps: Iterable[int]) -> list[LinearProbe]:
    """The exported probes of ``task`` at the chosen layers (names or patterns like ``up*``) and
    steps, in execution order (by step, then forward order). Unknown names fail listing valid ones."""
    registry = LayerRegistry(probes.spec.layers)
    chosen = registry.select(layers)
    steps = sorted({int(s) for s in steps})
    if not steps:
        raise ValueError("no edit steps chosen; pass steps like [0, 1, 2, 3, 4]")
    return [probes.get(task, layer.name, s) for s in steps for layer in chosen]


def optimise_activation(acts: Tensor, objective: Callable[[Tensor], Tensor],
                        settings: EditSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise a float32 copy of ``acts`` [B, T, C]; returns (optimised, loss before, loss after), per image.

    The per-image losses are summed, so each image's activation gets the gradient of its own loss
    (Adam is elementwise): a batch edits exactly as its images would one by one.
    """
    device_type = acts.device.type
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        z = acts.detach().to(torch.float32, copy=True).requires_grad_(True)   # a normal tensor, even from inference mode
        with torch.no_grad():
            before = objective(z)
        if settings.optimizer == "projection":
            if settings.iterations > 0:
                with torch.no_grad():
                    z = objective.project(z.detach())
        else:
            optim = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
            opt = optim([z], lr=settings.lr)
            for _ in range(settings.iterations):
                opt.zero_grad(set_to_none=True)
                objective(z).sum().backward()
                opt.step()
        with torch.no_grad():
            after = objective(z)
    return z.detach(), before, after


class ActivationEditor(ModuleHooks):
    """Replace the conditional half of chosen layers' outputs at chosen steps (module docstring).

    :param unet: the denoiser (U-Net or transformer) the hooks go on.
    :param probes: one exported probe per edited (step, layer) (see :func:`plan_edits`).
    :param layers: the model's layers (for each probe's hooked module and readout rule), e.g. the
        export's ``spec.layers``.
    :param target: ``[B, H, W]`` counterfactual targets in probe units, one per image of the batch.
    :param settings: the optimiser's settings.
    :param guidance: whether the batch is a CFG batch (uncond half first, then cond): ``cfg``
        ``batched`` (True) or ``none`` (False).
    :param on_edit: called after every edit (progress bars).
    :param cfg: the CFG layout (:data:`probes.diffusion.families.spec.CFG_LAYOUTS`); overrides
        ``guidance`` when given (``sequential``: FLUX's true CFG, the conditional call first).
    """

    def __init__(self, unet: nn.Module, probes: Sequence[LinearProbe], layers: Sequence[LayerInfo], target: Tensor,
                 settings: EditSettings = EditSettings(), guidance: bool = True,
                 on_edit: Callable[[EditRecord], None] | None = None, cfg: str | None = None,
                 measure: Callable[[tuple[int, str], Tensor, Tensor], list[float] | None] | None = None) -> None:
        cfg = cfg if cfg is not None else ("batched" if guidance else "none")
        if cfg not in CFG_LAYOUTS:
            raise ValueError(f"cfg layout must be one of {', '.join(CFG_LAYOUTS)}, got {cfg!r}")
        by_name = {layer.name: layer for layer in layers}
        self.plan: dict[tuple[int, str], LinearProbe] = {}
        for p in probes:
            if p.info.layer not in by_name:
                raise KeyError(f"probe {p.info.key} is for layer {p.info.layer!r}, which this model does not have; "
                               f"its layers: {', '.join(by_name)}")
            key = (int(p.info.step), p.info.layer)
            if key in self.plan:
                raise ValueError(f"two probes for step {key[0]}, layer {key[1]}: one edit per (step, layer)")
            self.plan[key] = p
        names = {layer for _, layer in self.plan}
        self.layers = [layer for layer in layers if layer.name in names]      # hooked modules, forward order
        self.unet, self.target, self.settings, self.cfg = unet, target, settings, cfg
        self.guidance = cfg == "batched"
        self.on_edit = on_edit
        self.measure = measure       # (key, tokens before, tokens after) -> per-image shift, or None
        self._objectives: dict[tuple[int, str], ProbeObjective] = {}
        self.reset()

    @property
    def num_edits(self) -> int:
        return len(self.plan)

    # -- lifecycle -------------------------------------------------------------------------
    def hooks(self):
        return [(layer.module, self._make_hook(layer)) for layer in self.layers]

    def pre_hooks(self):
        return [("", self._count_call)]

    def reset(self) -> None:
        """Back to step 0, with no edits recorded (one editor can serve several pipeline calls)."""
        self._step = 0
        self._calls_in_step = 0
        self.records: list[EditRecord] = []

    def _count_call(self, module: nn.Module, args: Any) -> None:
        self._calls_in_step += 1

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` of diffusers pipelines: the next hooks belong to step ``i + 1``."""
        self._step = i + 1
        self._calls_in_step = 0
        return callback_kwargs

    # -- the edit --------------------------------------------------------------------------
    def _objective(self, key: tuple[int, str], device: torch.device) -> ProbeObjective:
        obj = self._objectives.get(key)
        if obj is None or obj.target.device != device:
            probe = self.plan[key].to(device)
            obj = self._objectives[key] = ProbeObjective(probe, self.target.to(device), self.settings.huber_delta,
                                                           self.settings.binary_loss)
        return obj

    def _optimise(self, key: tuple[int, str], acts: Tensor, objective: ProbeObjective) -> tuple[Tensor, Tensor, Tensor]:
        """The edit of one (step, layer); a subclass may constrain it (:class:`.erasure.ErasingEditor`)."""
        return optimise_activation(acts, objective, self.settings)

    def _make_hook(self, layer: LayerInfo):
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            key = (self._step, layer.name)
            if key not in self.plan:
                return None                        # not edited here: the module's own output, untouched
            if self.cfg == "sequential" and self._calls_in_step != 1:
                return None                        # FLUX's true CFG: the unconditional call, untouched
            tokens = read_tokens(layer, out)       # [batch, tokens, channels] of image tokens
            n = tokens.shape[0]
            cond = tokens[n // 2:] if self.guidance else tokens
            if cond.shape[0] != self.target.shape[0]:
                raise ValueError(f"the editor holds targets for {self.target.shape[0]} images but layer {layer.name} "
                                 f"produced a batch of {cond.shape[0]} (conditional half); give one target per image")
            z, before, after = self._optimise(key, cond, self._objective(key, tokens.device))
            if self.guidance:
                new = tokens.clone()
                new[n // 2:] = z.to(tokens.dtype)
            else:
                new = z.to(tokens.dtype)
            new = write_tokens(layer, out, new)
            shift = self.measure(key, cond, z) if self.measure is not None else None
            record = EditRecord(step=key[0], layer=layer.name, loss_before=before.tolist(), loss_after=after.tolist(),
                                shift=list(shift or []))
            self.records.append(record)
            if self.on_edit is not None:
                self.on_edit(record)
            return new
        return hook
