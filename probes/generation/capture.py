"""Activation capture: forward hooks on the selected layers, for every denoising step.

One :class:`ActivationCapture` per generation batch, set and removed explicitly (a context
manager), like diffusers' attention processors. Steps are tracked through the pipeline's
``callback_on_step_end``, not a patched loop, so the stock pipeline runs unchanged and the
hooks only read: the generated image is bit-identical with and without capture (tested).

Activations are copied, as they are produced, into one preallocated buffer per layer on the
model's device, in the capture dtype (fp16 by default), and moved off the accelerator once per
batch: one device-to-host copy per layer instead of one per step and layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from probes.models.hooks import ModuleHooks
from probes.models.layers import LayerInfo

HALVES = {"cond": ("cond",), "both": ("uncond", "cond")}


class HookNeverFired(RuntimeError):
    """A selected layer produced nothing: its module was bypassed (e.g. a fused attention kernel)."""


class ActivationCapture(ModuleHooks):
    """Capture ``[batch, step, half, tokens, channels]`` per layer during one pipeline call.

    :param unet: the U-Net the hooks go on.
    :param layers: layers to capture (from :class:`probes.models.layers.LayerRegistry`).
    :param num_steps: denoising steps of the run (buffers hold the selected subset).
    :param steps: step indices (0..num_steps-1) to keep; ``None`` keeps all.
    :param halves: ``cond`` (the conditional half of the CFG batch, as the protocol) or ``both``.
    :param dtype: storage dtype of captured activations.
    :param guidance: whether the batch is a CFG batch (uncond half first, then cond).
    """

    def __init__(self, unet: nn.Module, layers: Sequence[LayerInfo], num_steps: int,
                 steps: Sequence[int] | None = None, halves: str = "cond",
                 dtype: torch.dtype = torch.float16, guidance: bool = True) -> None:
        if halves not in HALVES:
            raise ValueError(f"capture halves must be one of {sorted(HALVES)}, got {halves!r}")
        if halves == "both" and not guidance:
            raise ValueError("halves='both' needs classifier-free guidance (guidance_scale > 1)")
        self.unet, self.layers, self.num_steps = unet, list(layers), num_steps
        self.steps = list(range(num_steps)) if steps is None else sorted(set(int(s) for s in steps))
        bad = [s for s in self.steps if not 0 <= s < num_steps]
        if bad:
            raise ValueError(f"capture steps {bad} out of range 0..{num_steps - 1}")
        self._slot = {s: k for k, s in enumerate(self.steps)}
        self.halves, self.dtype, self.guidance = halves, dtype, guidance
        #: batched U-Net forward calls (one per step with K-LMS, whatever the batch size); the guided
        #: calls users see in the progress bar and summary are this times the images in the batch
        self.unet_calls = 0
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def hooks(self):
        return [(layer.module, self._make_hook(k)) for k, layer in enumerate(self.layers)]

    def pre_hooks(self):
        return [("", self._count_call)]

    def reset(self) -> None:
        """Forget the previous batch (buffers are reallocated lazily at the right size)."""
        self._step = 0
        self._buffers: list[torch.Tensor | None] = [None] * len(self.layers)
        self._fired = [[0] * self.num_steps for _ in self.layers]
        self.timesteps: list[float | None] = [None] * self.num_steps

    # -- hooks -----------------------------------------------------------------------------
    def _count_call(self, module: nn.Module, args: Any) -> None:
        self.unet_calls += 1

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` of diffusers pipelines: records the step's timestep."""
        self.timesteps[i] = float(t)
        self._step = i + 1
        return callback_kwargs

    def _make_hook(self, k: int):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            step = self._step
            if step >= self.num_steps:
                raise RuntimeError(f"layer {self.layers[k].name} fired after the last step ({self.num_steps})")
            self._fired[k][step] += 1
            slot = self._slot.get(step)
            if slot is None:
                return
            layer = self.layers[k]
            if out.ndim != 3 or out.shape[1:] != (layer.tokens, layer.channels):
                raise RuntimeError(
                    f"layer {layer.name} ({layer.module}) produced {tuple(out.shape)}; expected "
                    f"[batch, {layer.tokens}, {layer.channels}] (is the resolution in the config the one generated?)")
            n = out.shape[0]
            if self.guidance:
                halves = out.detach().view(2, n // 2, *out.shape[1:])  # [uncond, cond]
                data = halves[1:] if self.halves == "cond" else halves
            else:
                data = out.detach().unsqueeze(0)
            buf = self._buffers[k]
            if buf is None:
                b = data.shape[1]
                buf = torch.empty((b, len(self.steps), data.shape[0], *out.shape[1:]), dtype=self.dtype,
                                  device=out.device)
                self._buffers[k] = buf
            buf[:, slot].copy_(data.transpose(0, 1))
        return hook

    # -- results ---------------------------------------------------------------------------
    def check(self) -> None:
        """Every selected layer must have fired at every selected step."""
        for layer, fired in zip(self.layers, self._fired):
            if not any(fired):
                raise HookNeverFired(
                    f"the hook on layer {layer.name} ({layer.module}) never fired: the module was bypassed, "
                    f"e.g. by a fused attention processor. Use diffusers' AttnProcessor2_0 "
                    f"(unet.set_attn_processor(AttnProcessor2_0())) or drop the layer from data.capture.layers.")
            missing = [s for s in self.steps if fired[s] == 0]
            if missing:
                raise HookNeverFired(f"layer {layer.name} did not fire at steps {missing}")

    def collect(self, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
        """``{layer name: [batch, n_selected_steps, n_halves, tokens, channels]}``, checked."""
        self.check()
        out = {}
        for layer, buf in zip(self.layers, self._buffers):
            assert buf is not None
            out[layer.name] = buf if device is None else buf.to(device)
        return out

