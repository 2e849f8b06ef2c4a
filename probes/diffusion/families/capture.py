"""Capture for every family: :class:`ActivationCapture` with readout rules and CFG layouts.

The store, the labels and the probes consume ``[batch, step, half, tokens, channels]`` per layer,
halves ordered ``[uncond, cond]``. :class:`ActivationCapture` produces that for the U-Net; this
subclass produces the same for any family by changing two things only:

- each hook first applies the layer's readout rule (:mod:`probes.diffusion.families.readout`), so
  what reaches the buffers is ``[batch', tokens, channels]`` of image tokens, whatever the module
  returned (a pair of token streams, text-then-image tokens, a feature map);
- the CFG layout (:data:`probes.diffusion.families.spec.CFG_LAYOUTS`): ``batched`` and ``none`` are
  ActivationCapture's ``guidance=True/False``; ``sequential`` (FLUX's true CFG: a conditional
  call, then an unconditional one, per step) holds the conditional call's tokens until the
  unconditional call arrives and hands both on as one ``[uncond, cond]`` batch, so the buffers and
  everything downstream see the batched layout.

Steps come from the pipeline's step callback (:meth:`step_callback_kwargs` builds the right one:
``callback_on_step_end``, or PixArt's ``callback(step, t, latents)``), which records the step's
scheduler timestep (``timesteps``) and, where the scheduler has them, its sigma (``sigmas``: for
flow matching, the interpolation weight the transformer sees as ``timestep / 1000``). The hooks
only read, so the image is bit-identical with and without capture (tested per family).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from probes.diffusion.families.readout import readout_rule
from probes.diffusion.families.spec import CFG_LAYOUTS, Family
from probes.diffusion.layers import LayerInfo
from probes.generation.capture import ActivationCapture


class ReadoutCapture(ActivationCapture):
    """Capture ``[batch, step, half, tokens, channels]`` per layer from any family's denoiser.

    :param denoiser: the U-Net or transformer the hooks go on (``ActivationCapture.unet``).
    :param layers: layers to capture, each with its ``readout`` rule (plain :class:`LayerInfo`:
        ``tokens``).
    :param cfg: ``batched`` ([uncond, cond] in one call), ``sequential`` (cond call, then uncond
        call) or ``none`` (one pass, stored as the cond half).
    The other parameters are :class:`ActivationCapture`'s.
    """

    def __init__(self, denoiser: nn.Module, layers: Sequence[LayerInfo], num_steps: int,
                 steps: Sequence[int] | None = None, halves: str = "cond", dtype: torch.dtype = torch.float16,
                 cfg: str = "batched") -> None:
        if cfg not in CFG_LAYOUTS:
            raise ValueError(f"cfg layout must be one of {', '.join(CFG_LAYOUTS)}, got {cfg!r}")
        if halves == "both" and cfg == "none":
            raise ValueError("capture halves='both' needs classifier-free guidance: guidance_scale > 1 (FLUX: "
                             "true_cfg_scale > 1 with a negative prompt); this call runs one pass per step")
        self.cfg = cfg
        self._rules = [readout_rule(getattr(layer, "readout", "tokens")) for layer in layers]
        super().__init__(denoiser, layers, num_steps, steps, halves, dtype, guidance=cfg != "none")

    def reset(self) -> None:
        super().reset()
        self.sigmas: list[float | None] = [None] * self.num_steps
        self._calls_in_step = 0
        self._held: dict[int, torch.Tensor] = {}

    # -- hooks -----------------------------------------------------------------------------
    def _count_call(self, module: nn.Module, args: Any) -> None:
        super()._count_call(module, args)
        self._calls_in_step += 1
        if self.cfg == "sequential" and self._calls_in_step > 2:
            raise RuntimeError(f"cfg layout 'sequential' expects two denoiser calls per step (cond, then uncond); "
                               f"step {self._step} made {self._calls_in_step}")

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
        if sigmas is not None and i < len(sigmas) and i < self.num_steps:
            self.sigmas[i] = float(sigmas[i])
        if self._held:
            raise RuntimeError(f"cfg layout 'sequential': step {i} ended after the conditional call only (layers "
                               f"{[self.layers[k].name for k in self._held]}); is true CFG on in this call?")
        self._calls_in_step = 0
        return super().on_step_end(pipe, i, t, callback_kwargs)

    def _make_hook(self, k: int):
        store = super()._make_hook(k)
        layer, rule = self.layers[k], self._rules[k]

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            tokens = rule(out, layer)
            if self.cfg == "sequential" and not layer.in_vae:
                if self._calls_in_step == 1:          # the conditional call comes first (FluxPipeline)
                    self._held[k] = tokens.detach()
                    return None
                tokens = torch.cat([tokens, self._held.pop(k)])   # as a batched call: [uncond, cond]
            store(module, args, tokens)
            return None                                # a hook that returns a value would replace the output
        return hook

    # -- step reporting --------------------------------------------------------------------
    def step_callback_kwargs(self, pipe: Any, family: Family, then: Any = None) -> dict[str, Any]:
        """The pipeline-call arguments that report each step to this capture (and then to ``then``,
        a ``callback_on_step_end``-style function, if given)."""
        def on_step_end(pipe_: Any, i: int, t: Any, kwargs: dict) -> dict:
            kwargs = self.on_step_end(pipe_, i, t, kwargs)
            return then(pipe_, i, t, kwargs) if then is not None else kwargs

        if family.legacy_callback:
            return {"callback": lambda i, t, latents: on_step_end(pipe, i, t, {"latents": latents}),
                    "callback_steps": 1}
        return {"callback_on_step_end": on_step_end}
