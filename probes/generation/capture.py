"""Activation capture: forward hooks on the selected layers, for every denoising step.

One :class:`ActivationCapture` per generation batch, set and removed explicitly (a context
manager), like diffusers' attention processors. Steps are tracked through the pipeline's
``callback_on_step_end``, not a patched loop, so the stock pipeline runs unchanged and the
hooks only read: the generated image is bit-identical with and without capture (tested).

Activations are copied, as they are produced, into one preallocated buffer per layer on the
model's device, in the capture dtype (fp16 by default), and moved off the accelerator once per
batch: one device-to-host copy per layer instead of one per step and layer.

Every family goes through the same object (:mod:`probes.diffusion.families`); two things differ:

- each hook first applies the layer's readout rule (:mod:`probes.diffusion.readout`), so what
  reaches the buffers is ``[batch', tokens, channels]`` of image tokens, whatever the module
  returned (a U-Net self-attention's tokens, a transformer block's pair of token streams, text
  tokens followed by image tokens);
- the CFG layout (:data:`probes.diffusion.families.spec.CFG_LAYOUTS`): ``batched`` (``[uncond,
  cond]`` in one denoiser call per step: SD 1.x/2.x, SDXL, SD3, PixArt), ``none`` (one pass,
  stored as the cond half: guidance off, or FLUX's guidance-distilled models) and ``sequential``
  (FLUX's true CFG: a conditional call, then an unconditional one, per step): the conditional
  call's tokens are held until the unconditional call arrives and both are handed on as one
  ``[uncond, cond]`` batch, so the buffers and everything downstream see the batched layout.

Each step's scheduler timestep is recorded (``timesteps``) and, where the scheduler has them, its
sigma (``sigmas``: for flow matching the interpolation weight, ``timestep / 1000``; for K-LMS the
noise level of the step's input).

The VAE decoder's probe (``vae.mid``, see :mod:`probes.diffusion.layers`) is read in
:meth:`ActivationCapture.on_step_end` from the latent the pipeline hands the callback (x_{t-1}
after the scheduler step: the latent the decoded-image baseline decodes): the decoder's
``post_quant_conv``, ``conv_in`` and ``mid_block`` run on ``latents / scaling_factor`` with a hook
on the mid-block attention's output projection; the up-blocks, which nothing reads, do not run.
The latent has no classifier-free-guidance halves, so it is stored as the ``cond`` half (and
``halves: both`` refuses it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from probes.diffusion.families.spec import CFG_LAYOUTS
from probes.diffusion.hooks import HookNeverFired, ModuleHooks
from probes.diffusion.layers import VAE_PREFIX, LayerInfo
from probes.diffusion.readout import readout_rule

HALVES = {"cond": ("cond",), "both": ("uncond", "cond")}


class ActivationCapture(ModuleHooks):
    """Capture ``[batch, step, half, tokens, channels]`` per layer during one pipeline call.

    :param unet: the denoiser (U-Net or transformer) the hooks go on.
    :param layers: layers to capture (from :class:`probes.diffusion.layers.LayerRegistry`), each
        read by its ``readout`` rule.
    :param num_steps: denoising steps of the run (buffers hold the selected subset).
    :param steps: step indices (0..num_steps-1) to keep; ``None`` keeps all.
    :param halves: ``cond`` (the conditional half of the CFG batch, as the protocol) or ``both``.
    :param dtype: storage dtype of captured activations.
    :param guidance: whether the batch is a CFG batch (uncond half first, then cond); the same as
        ``cfg="batched"`` (True) or ``cfg="none"`` (False).
    :param cfg: the CFG layout (module docstring); overrides ``guidance`` when given.
    :param record_inputs: also record the U-Net's inputs at each selected step (:meth:`collect_inputs`):
        the latent model input ``x_t`` (one copy: the two CFG halves are the same latent), the
        timestep and the text embeddings (both CFG halves), the trajectory ``probes.replay`` runs
        another U-Net on (U-Nets conditioned on text alone, batched or no CFG).
    """

    def __init__(self, unet: nn.Module, layers: Sequence[LayerInfo], num_steps: int,
                 steps: Sequence[int] | None = None, halves: str = "cond",
                 dtype: torch.dtype = torch.float16, guidance: bool = True, cfg: str | None = None,
                 record_inputs: bool = False) -> None:
        cfg = cfg if cfg is not None else ("batched" if guidance else "none")
        if cfg not in CFG_LAYOUTS:
            raise ValueError(f"cfg layout must be one of {', '.join(CFG_LAYOUTS)}, got {cfg!r}")
        if record_inputs and cfg == "sequential":
            raise ValueError("data.capture.record_inputs covers one denoiser call per step (batched CFG or none); "
                             "this model calls it twice per step (true CFG): set record_inputs: false")
        guidance = cfg != "none"
        if halves not in HALVES:
            raise ValueError(f"capture halves must be one of {sorted(HALVES)}, got {halves!r}")
        if halves == "both" and not guidance:
            raise ValueError("halves='both' needs classifier-free guidance: guidance_scale > 1 (FLUX: true_cfg_scale "
                             "> 1 with a negative prompt); this call runs one pass per step")
        vae_layers = [layer.name for layer in layers if layer.in_vae]
        if vae_layers and halves != "cond":
            raise ValueError(f"capture layers {vae_layers} read the VAE decoder on the latent, which has no "
                             f"classifier-free-guidance halves: use capture.halves=cond, or drop them from "
                             f"capture.layers")
        self.unet, self.layers, self.num_steps = unet, list(layers), num_steps
        self.steps = list(range(num_steps)) if steps is None else sorted(set(int(s) for s in steps))
        bad = [s for s in self.steps if not 0 <= s < num_steps]
        if bad:
            raise ValueError(f"capture steps {bad} out of range 0..{num_steps - 1}")
        self._slot = {s: k for k, s in enumerate(self.steps)}
        self.halves, self.dtype, self.guidance, self.cfg = halves, dtype, guidance, cfg
        self.record_inputs = record_inputs
        self._rules = [readout_rule(layer.readout) for layer in self.layers]
        #: batched U-Net forward calls (one per step with K-LMS, whatever the batch size); the guided
        #: calls users see in the progress bar and summary are this times the images in the batch
        self.unet_calls = 0
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def hooks(self):
        """The U-Net's layers (the VAE's are read in :meth:`on_step_end`)."""
        return [(layer.module, self._make_hook(k)) for k, layer in enumerate(self.layers) if not layer.in_vae]

    def pre_hooks(self):
        return [("", self._count_call)]

    def kwarg_pre_hooks(self):
        return [("", self._record_inputs)] if self.record_inputs else []

    def reset(self) -> None:
        """Forget the previous batch (buffers are reallocated lazily at the right size)."""
        self._step = 0
        self._buffers: list[torch.Tensor | None] = [None] * len(self.layers)
        self._fired = [[0] * self.num_steps for _ in self.layers]
        self.timesteps: list[float | None] = [None] * self.num_steps
        self.sigmas: list[float | None] = [None] * self.num_steps
        self._calls_in_step = 0
        self._held: dict[int, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._input_t: list[torch.Tensor | None] = [None] * len(self.steps)

    # -- hooks -----------------------------------------------------------------------------
    def _count_call(self, module: nn.Module, args: Any) -> None:
        self.unet_calls += 1
        self._calls_in_step += 1
        if self.cfg == "sequential" and self._calls_in_step > 2:
            raise RuntimeError(f"cfg layout 'sequential' expects two denoiser calls per step (cond, then uncond); "
                               f"step {self._step} made {self._calls_in_step}")

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The U-Net's ``(sample, timestep, encoder_hidden_states)`` at a selected step (the last call of
        the step wins, as for the activations)."""
        slot = self._slot.get(self._step)
        if slot is None:
            return
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if sample is None or t is None or text is None or kwargs.get("added_cond_kwargs") \
                or kwargs.get("timestep_cond") is not None:
            raise NotImplementedError("recording the denoiser's inputs covers U-Nets conditioned on text embeddings "
                                      "alone (SD 1.x / 2.x); this model passes other conditioning too "
                                      "(data.capture.record_inputs needs it): set record_inputs: false")
        n = sample.shape[0]
        if self.guidance:
            halves = sample.detach().view(2, n // 2, *sample.shape[1:])
            if not torch.equal(halves[0], halves[1]):
                raise RuntimeError("the two classifier-free-guidance halves of the U-Net's input differ: the "
                                   "recorded latent would not be the one the conditional half saw")
            x, emb = halves[1], text.detach().view(2, n // 2, *text.shape[1:]).transpose(0, 1)   # [B, 2, L, D]
        else:
            x, emb = sample.detach(), text.detach().unsqueeze(1)
        if not self._inputs:
            self._inputs = {"latents": torch.empty((x.shape[0], len(self.steps), *x.shape[1:]), dtype=x.dtype,
                                                   device=x.device),
                            "text": emb.clone()}
        self._inputs["latents"][:, slot].copy_(x)
        self._input_t[slot] = torch.as_tensor(t).detach().reshape(-1)[:1].clone()

    def at_step(self, step: int, t: float) -> None:
        """Say that the next U-Net call is denoising step ``step`` at timestep ``t`` (a replay calls the U-Net
        itself, step by step, with no sampler callback)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} out of range 0..{self.num_steps - 1}")
        self._step = step
        self.timesteps[step] = float(t)

    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` of diffusers pipelines: records the step's timestep and sigma, and
        reads the VAE decoder's layers on the step's latent (``callback_kwargs["latents"]``)."""
        self.timesteps[i] = float(t)
        sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
        if sigmas is not None and i < len(sigmas):
            self.sigmas[i] = float(sigmas[i])
        if self._held:
            raise RuntimeError(f"cfg layout 'sequential': step {i} ended after the conditional call only (layers "
                               f"{[self.layers[k].name for k in self._held]}); is true CFG on in this call?")
        self._calls_in_step = 0
        vae_layers = [k for k, layer in enumerate(self.layers) if layer.in_vae]
        if vae_layers and i < self.num_steps:
            if "latents" not in callback_kwargs:
                raise RuntimeError("capturing the VAE decoder needs the step's latent: the pipeline's "
                                   "callback_on_step_end_tensor_inputs must include 'latents'")
            self._capture_vae(pipe.vae, callback_kwargs["latents"], vae_layers)
        self._step = i + 1
        return callback_kwargs

    def _capture_vae(self, vae: nn.Module, latents: torch.Tensor, which: list[int]) -> None:
        """Run the VAE decoder up to its mid block on ``latents`` with the VAE layers' hooks on."""
        handles = [vae.get_submodule(self.layers[k].module[len(VAE_PREFIX):]).register_forward_hook(self._make_hook(k))
                   for k in which]
        try:
            decoder_mid(vae, latents)
        finally:
            for h in handles:
                h.remove()

    def _make_hook(self, k: int):
        layer, rule = self.layers[k], self._rules[k]

        def hook(module: nn.Module, args: Any, raw: Any) -> None:
            step = self._step
            if step >= self.num_steps:
                raise RuntimeError(f"layer {layer.name} fired after the last step ({self.num_steps})")
            out = rule(raw, layer)                      # [batch', tokens, channels] of image tokens, checked
            if self.cfg == "sequential" and not layer.in_vae:
                if self._calls_in_step == 1:            # the conditional call comes first (FluxPipeline)
                    self._held[k] = out.detach()
                    return None
                out = torch.cat([out, self._held.pop(k)])   # as a batched call: [uncond, cond]
            self._fired[k][step] += 1
            slot = self._slot.get(step)
            if slot is None:
                return None                             # a hook that returned a value would replace the output
            n = out.shape[0]
            if layer.in_vae:                   # the latent: one row per image, stored as the cond half
                data = out.detach().unsqueeze(0)
            elif self.guidance:
                halves = out.detach().reshape(2, n // 2, *out.shape[1:])  # [uncond, cond]
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
            return None
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

    def collect_inputs(self, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
        """``{"latents": [B, S_sel, C, h, w], "text": [B, halves, L, D], "timesteps": [S_sel]}``: the U-Net's
        inputs at every selected step, in the dtypes it received them (``timesteps`` keeps the timestep's)."""
        missing = [s for s, t in zip(self.steps, self._input_t) if t is None]
        if not self._inputs or missing:
            raise HookNeverFired(f"the U-Net's inputs were not recorded at steps {missing or self.steps}")
        out = {**self._inputs, "timesteps": torch.cat(self._input_t)}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def collect(self, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
        """``{layer name: [batch, n_selected_steps, n_halves, tokens, channels]}``, checked."""
        self.check()
        out = {}
        for layer, buf in zip(self.layers, self._buffers):
            assert buf is not None
            out[layer.name] = buf if device is None else buf.to(device)
        return out



def decoder_mid(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The VAE decoder's mid-block output for pipeline latents: what ``vae.decode`` computes before
    its up-blocks (``post_quant_conv`` if any, ``decoder.conv_in``, ``decoder.mid_block``), from the
    latents unscaled by ``scaling_factor`` as the pipeline does before decoding."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder.mid_block(vae.decoder.conv_in(z), None)
