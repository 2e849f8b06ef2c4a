"""Latent guidance: the second edit mode, after Readout Guidance (Luo et al., CVPR 2024).

Why: the activation editor replaces a layer's output, so whatever the U-Net computes afterwards
starts from activations it never produces itself (the edit recolours). Guidance instead changes
only the latent ``x_t`` at chosen steps, in the direction that lowers the probe's loss on the
U-Net's own activations, and lets the U-Net redraw from it: every activation stays one the model
computed.

One guided step ``i``, before the U-Net call of that step:

1. run the U-Net on ``x_t`` (the same call the pipeline makes: CFG batch, prompt embeddings,
   timestep) with gradients, reading the planned layers' conditional half;
2. loss per image = the mean over the step's planned layers of the probe's task loss against the
   target (:class:`~probes.intervention.objective.ProbeObjective`, as the editor's);
3. ``g`` = its gradient with respect to the **model input** ``s = scale_model_input(x_t)``, the
   variance-preserving latent (unit variance at every step; for K-LMS ``s = x_t / sqrt(σ² + 1)``,
   for DDIM/PNDM ``s = x_t``), normalised per image to unit RMS; ``s <- s - weight · g / rms(g)``,
   i.e. ``x_t <- x_t - weight · g / rms(g) / c`` with ``c = s / x_t`` the scheduler's factor.
   ``weight`` is thus the RMS change of the unit-variance latent per iteration, whatever the step's
   noise level: Readout Guidance's own update (AdamW, lr 2e-2) moves each element by about its
   learning rate on its first iteration, the same scale. Repeated ``iterations`` times per step;
4. the pipeline's U-Net call then sees the guided latent, and the scheduler steps from it.

How, without a copied denoising loop: ``callback_on_step_end`` runs *after* the scheduler step
and never before step 0, so it cannot change the latent a step's U-Net call sees at step 0, and
changing it afterwards would leave that step's scheduler update inconsistent. So this object, for
the length of a ``with`` block (like the editor's hooks), intercepts the three calls the stock
pipeline makes per step: ``scheduler.scale_model_input`` (to learn ``x_t``), the U-Net's forward
pre-hook (to guide and hand the U-Net the guided input; it also knows the call's prompt embeddings
and timestep) and ``scheduler.step`` (to step from the guided ``x_t``, so the scheduler's update is
the one for the latent the U-Net saw). Steps are counted by ``callback_on_step_end`` as
everywhere else. With ``weight = 0`` the guided latent is the original one and the image is
reproduced bit for bit (tested).

The guidance's own U-Net call also fires other hook objects' hooks. A capture listed alongside
sees the pipeline's call last, so its buffers hold the guided step's real activations; do not
combine guidance with an :class:`~probes.intervention.editor.ActivationEditor`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from probes.diffusion.hooks import ModuleHooks
from probes.diffusion.layers import LayerInfo
from probes.experiments.intervention.editor import EditRecord
from probes.experiments.intervention.objective import BINARY_LOSSES, ProbeObjective
from probes.export.probeset import LinearProbe

_MISSING = object()


@dataclass(frozen=True)
class GuidanceSettings:
    """How the latent is guided at each planned step.

    :param weight: RMS change of the variance-preserving latent per iteration (module docstring);
        0 reproduces the unguided image bit for bit.
    :param iterations: gradient steps on the latent per guided step (Readout Guidance's 1).
    :param huber_delta: regression tasks' Huber threshold, in probe z-units.
    :param binary_loss: ``cross_entropy`` or ``squared`` (as the editor's).
    """

    weight: float = 0.02
    iterations: int = 1
    huber_delta: float = 1.0
    binary_loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if self.weight < 0 or self.iterations < 1:
            raise ValueError(f"guidance weight must be >= 0 and iterations >= 1, got weight={self.weight}, "
                             f"iterations={self.iterations}")
        if self.binary_loss not in BINARY_LOSSES:
            raise ValueError(f"guidance binary_loss must be one of {BINARY_LOSSES}, got {self.binary_loss!r}")


class LatentGuidance(ModuleHooks):
    """Guide the latent at the planned steps towards the probes' target (module docstring).

    :param pipe: the diffusers pipeline (its ``unet`` and, at entry, its ``scheduler``).
    :param probes: one exported probe per guided (step, layer) (see
        :func:`~probes.intervention.editor.plan_edits`); a step's loss averages its layers.
    :param layers: the model's layers (for each probe's hooked module).
    :param target: ``[B, H, W]`` counterfactual targets in probe units, one per image.
    :param settings: weight, iterations, loss.
    :param guidance: whether the batch is a CFG batch (uncond half first, then cond).
    :param on_edit: called after every guided step with its record (progress bars).
    """

    def __init__(self, pipe: Any, probes: Sequence[LinearProbe], layers: Sequence[LayerInfo], target: Tensor,
                 settings: GuidanceSettings = GuidanceSettings(), guidance: bool = True,
                 on_edit: Callable[[EditRecord], None] | None = None) -> None:
        by_name = {layer.name: layer for layer in layers}
        self.plan: dict[int, dict[str, LinearProbe]] = {}
        for p in probes:
            if p.info.layer not in by_name:
                raise KeyError(f"probe {p.info.key} is for layer {p.info.layer!r}, which this model does not have; "
                               f"its layers: {', '.join(by_name)}")
            step = self.plan.setdefault(int(p.info.step), {})
            if p.info.layer in step:
                raise ValueError(f"two probes for step {p.info.step}, layer {p.info.layer}: one per (step, layer)")
            step[p.info.layer] = p
        if not self.plan:
            raise ValueError("latent guidance needs at least one probe (a step and layer to read)")
        names = {name for step in self.plan.values() for name in step}
        self.layers = [layer for layer in layers if layer.name in names]        # forward order
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ValueError(f"latent guidance steps a U-Net's variance-preserving latent through its scheduler; "
                             f"{type(pipe).__name__} has no U-Net: use the activation editor (method: edit)")
        self.pipe, self.unet, self.target = pipe, unet, target
        self.settings, self.guidance, self.on_edit = settings, guidance, on_edit
        self._objectives: dict[tuple[int, str], ProbeObjective] = {}
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def hooks(self):
        return [(layer.module, self._make_hook(layer.name)) for layer in self.layers]

    def __enter__(self):
        super().__enter__()
        self._handles.append(self.unet.register_forward_pre_hook(self._guide, with_kwargs=True))
        sched = self._scheduler = self.pipe.scheduler
        self._saved = {name: sched.__dict__.get(name, _MISSING) for name in ("scale_model_input", "step")}
        self._scale, self._step_fn = sched.scale_model_input, sched.step
        sched.scale_model_input, sched.step = self._record_latent, self._step_from_guided
        return self

    def __exit__(self, *exc: Any) -> None:
        sched = getattr(self, "_scheduler", None)
        if sched is not None:
            for name, value in self._saved.items():
                if value is _MISSING:
                    sched.__dict__.pop(name, None)
                else:
                    setattr(sched, name, value)
            self._scheduler = None
        super().__exit__(*exc)

    def reset(self) -> None:
        """Back to step 0 with nothing recorded (one object can serve several pipeline calls)."""
        self._step, self._guided_at = 0, -1
        self._latent: Tensor | None = None
        self._pending: Tensor | None = None
        self._mode = ""                              # "inner": the guidance's call, "after": the pipeline's
        self._acts: dict[str, Tensor] = {}
        self._before: Tensor | None = None
        self.records: list[EditRecord] = []

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: closes step ``i``'s record; the next calls belong to step ``i + 1``."""
        if self._before is not None:
            after = self._loss(i, {k: v for k, v in self._acts.items()})
            record = EditRecord(step=i, layer=",".join(self.plan[i]), loss_before=self._before.tolist(),
                                loss_after=after.tolist())
            self.records.append(record)
            if self.on_edit is not None:
                self.on_edit(record)
        self._before, self._acts, self._mode = None, {}, ""
        self._step = i + 1
        return callback_kwargs

    # -- the three intercepted calls ---------------------------------------------------------
    def _record_latent(self, sample: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._latent = sample
        return self._scale(sample, *args, **kwargs)

    def _step_from_guided(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any):
        if self._pending is not None:
            if self._pending.shape != sample.shape:
                raise RuntimeError(f"the guided latent {tuple(self._pending.shape)} does not match the pipeline's "
                                   f"{tuple(sample.shape)}")
            sample, self._pending = self._pending.to(sample.dtype), None
        return self._step_fn(model_output, timestep, sample, *args, **kwargs)

    def _guide(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._mode == "inner" or self._step not in self.plan or self._guided_at == self._step:
            return None
        self._guided_at = self._step
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if self._latent is None or self._latent.shape != sample.shape:
            raise RuntimeError("latent guidance did not see this step's scheduler.scale_model_input call; it works "
                               "with pipelines that scale the latent through the scheduler before the U-Net")
        n = sample.shape[0]
        x = self._latent[n // 2:] if self.guidance else self._latent
        if x.shape[0] != self.target.shape[0]:
            raise ValueError(f"the guidance holds targets for {self.target.shape[0]} images but the batch has "
                             f"{x.shape[0]}; give one target per image")
        rest = {k: v for k, v in kwargs.items() if k != "sample"}
        rest.pop("timestep", None)
        for k in range(self.settings.iterations):
            x, loss = self._descend(x, timestep, rest)
            if k == 0:
                self._before = loss
        self._pending = x
        guided = self._scale(torch.cat([x, x]) if self.guidance else x, timestep)
        self._mode, self._acts = "after", {}
        if not args:
            return args, dict(kwargs, sample=guided)
        return (guided, *args[1:]), kwargs

    # -- the gradient step -------------------------------------------------------------------
    def _descend(self, x: Tensor, timestep: Any, unet_kwargs: dict) -> tuple[Tensor, Tensor]:
        """One normalised gradient step on the latent ``x`` [B, ...]; returns (new x, loss at x)."""
        with torch.inference_mode(False), torch.enable_grad():
            s = self._scale(x.detach().clone(), timestep).detach().to(torch.float32).requires_grad_(True)
            inp = (torch.cat([s, s]) if self.guidance else s).to(x.dtype)
            self._mode, self._acts = "inner", {}
            try:
                self.unet(inp, timestep, **unet_kwargs)
            finally:
                self._mode = ""
            loss = self._loss(self._step, self._acts)
            (g,) = torch.autograd.grad(loss.sum(), s)
        self._acts = {}
        dims = tuple(range(1, g.ndim))
        rms = g.square().mean(dims, keepdim=True).sqrt().clamp_min(torch.finfo(g.dtype).tiny)
        factor = self._scale(torch.ones_like(x), timestep).to(torch.float32)       # c = s / x_t
        new = (x.to(torch.float32) - self.settings.weight * (g / rms) / factor).to(x.dtype)
        return new.detach(), loss.detach()

    def _objective(self, step: int, layer: str, device: torch.device) -> ProbeObjective:
        key = (step, layer)
        obj = self._objectives.get(key)
        if obj is None or obj.target.device != device:
            obj = self._objectives[key] = ProbeObjective(self.plan[step][layer].to(device), self.target.to(device),
                                                         self.settings.huber_delta, self.settings.binary_loss)
        return obj

    def _loss(self, step: int, acts: dict[str, Tensor]) -> Tensor:
        """Per-image probe loss, averaged over the step's planned layers (float32, no autocast)."""
        missing = [name for name in self.plan[step] if name not in acts]
        if missing:
            raise RuntimeError(f"layers {missing} did not fire during the U-Net call of step {step}")
        with torch.autocast(next(iter(acts.values())).device.type, enabled=False):
            losses = [self._objective(step, name, a.device)(a.to(torch.float32)) for name, a in acts.items()
                      if name in self.plan[step]]
        return torch.stack(losses).mean(0)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if not self._mode or name not in self.plan.get(self._step, {}):
                return None
            n = out.shape[0]
            cond = out[n // 2:] if self.guidance else out
            self._acts[name] = cond if self._mode == "inner" else cond.detach()
            return None
        return hook
