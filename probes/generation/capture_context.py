"""Capture from your own pipeline call: ``with capture(pipe, layers=["up*"], steps=[0, 3]) as acts: pipe(...)``.

The store's generation (:func:`probes.generation.sampling.generate`) builds every pipeline call
itself. Someone who already has a pipeline and a call of their own wants the same activations
without adopting that machinery, so this wraps the same :class:`ActivationCapture` (same layer
names, readout rules, CFG halves) around whatever call they make inside the block.

The store knows the step from the ``callback_on_step_end`` it passes; a user's call passes its own
(or none), so here the step is told by the scheduler: for the length of the block
``pipe.scheduler`` is a copy of itself (same class and config) whose ``set_timesteps`` starts a
call and whose ``step`` ends a step, the object-swap diffusers uses for attention processors. The
pipeline runs unchanged and the hooks only read: images are the same with and without capture.

**torch.compile.** Compiled code keeps the hooks that were there when it was traced: hooks added to
a denoiser that was compiled and run before are never called. So the hooks go on first and the
denoiser is compiled after them: ``capture(pipe, ..., compile=True)`` (or a backend name, or
``torch.compile``'s keyword arguments) registers the hooks, then sets ``pipe.<denoiser>`` to
``torch.compile(<denoiser>)`` for the length of the block and puts the plain module back on exit.
A denoiser passed in already compiled is refused with that advice. Dynamo traces the hooks into the
graph, so the step they read becomes a guard: the denoiser is recompiled once per captured step
(torch 2.14; past ``torch._dynamo.config.recompile_limit`` the remaining steps run eagerly, still
captured). Compiled capture equals eager capture (tested on CPU, tiny model).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from probes.diffusion.families.layers import pipeline_registry
from probes.diffusion.families.spec import family_of, native_size
from probes.diffusion.hooks import HookNeverFired
from probes.diffusion.layers import LayerInfo
from probes.generation.capture import ActivationCapture


class CapturedActivations(Mapping):
    """``acts[(step, layer)]``: ``[batch, tokens, channels]`` of the conditional half (``halves="both"``:
    ``[batch, 2, tokens, channels]``, unconditional first), rows of every pipeline call of the block
    in call order. ``steps`` are the denoising-step indices (0 = the first, noisiest step) and
    ``timesteps[step]`` the scheduler's timestep there."""

    def __init__(self, layers: Sequence[LayerInfo], halves: str) -> None:
        self.layers = [layer.name for layer in layers]
        self.halves = halves
        self.steps: list[int] = []
        self.timesteps: dict[int, float] = {}
        self._calls: list[dict[str, torch.Tensor]] = []   # per call: {layer: [B, S_sel, halves, T, C]}

    def _add_call(self, acts: dict[str, torch.Tensor], steps: list[int], timesteps: list[float | None]) -> None:
        if self._calls and steps != self.steps:
            raise ValueError(f"pipeline calls in one capture block captured different steps ({self.steps} then {steps}): "
                             f"give every call the same num_inference_steps, or pass capture(..., steps=[...])")
        self.steps = steps
        self.timesteps = {s: float(timesteps[s]) for s in steps if timesteps[s] is not None}
        self._calls.append(acts)

    @property
    def calls(self) -> int:
        """Pipeline calls captured so far."""
        return len(self._calls)

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        step, layer = key
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not captured; captured: {', '.join(self.layers)}")
        if step not in self.steps:
            raise KeyError(f"step {step} was not captured; captured steps: {self.steps}"
                           + ("" if self._calls else " (no pipeline call has finished inside the block yet)"))
        slot = self.steps.index(step)
        out = torch.cat([call[layer][:, slot] for call in self._calls])
        return out[:, 0] if self.halves == "cond" else out

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter([(s, name) for s in self.steps for name in self.layers])

    def __len__(self) -> int:
        return len(self.steps) * len(self.layers) if self._calls else 0

    def __repr__(self) -> str:
        return (f"CapturedActivations(calls={self.calls}, steps={self.steps}, layers={self.layers}, "
                f"halves={self.halves!r})")


class _Session:
    """The hooks of one ``with`` block: one :class:`ActivationCapture` per pipeline call, started by the
    scheduler's ``set_timesteps`` and collected when the call's last step ends."""

    def __init__(self, pipe: Any, denoiser: nn.Module, layers: list[LayerInfo], steps: Sequence[int] | None,
                 halves: str, dtype: torch.dtype, cfg: str | None, acts: CapturedActivations) -> None:
        self.pipe, self.denoiser, self.layers, self.steps = pipe, denoiser, layers, steps
        self.halves, self.dtype, self.cfg, self.acts = halves, dtype, cfg, acts
        self.family = family_of(pipe)
        self.cap: ActivationCapture | None = None
        self.step = 0
        self.open = False
        # the modules and the hook of each, once: they dispatch to the call's capture
        template = ActivationCapture(denoiser, layers, 1, None, halves, dtype, cfg="none" if halves == "cond" else "batched")
        self.paths = [path for path, _ in template.hooks()]

    def cfg_layout(self) -> str:
        if self.cfg is not None:
            return self.cfg
        if self.family.guidance == "distilled":
            return "none"
        return "batched" if bool(getattr(self.pipe, "do_classifier_free_guidance", True)) else "none"

    def start_call(self, num_steps: int) -> None:
        self.cap = ActivationCapture(self.denoiser, self.layers, num_steps, self.steps, self.halves, self.dtype,
                                     cfg=self.cfg_layout())
        self.hooks = [fn for _, fn in self.cap.hooks()]
        self.step = 0

    def forward_hook(self, k: int):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.open:       # compiled code traced inside a block that has ended: nothing to record
                return None
            if self.cap is None:
                raise RuntimeError("a captured layer ran outside a pipeline call's denoising loop (the denoiser was "
                                   "called directly, or the pipeline's scheduler was replaced inside the capture block): "
                                   "call the pipeline itself inside `with capture(pipe, ...)`")
            self.hooks[k](module, args, out)
        return hook

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.open and self.cap is not None:
            self.cap._count_call(module, args)

    def end_step(self, timestep: Any, latents: torch.Tensor) -> None:
        cap = self.cap
        if cap is None:
            return
        cap.on_step_end(self.pipe, self.step, timestep, {"latents": latents})
        self.step += 1
        if self.step == cap.num_steps:
            self.acts._add_call(cap.collect(), list(cap.steps), list(cap.timesteps))
            self.cap = None


def _reporting_scheduler(scheduler: Any, session: _Session) -> Any:
    """A copy of ``scheduler`` (same class and config) that reports the start of a call and every step."""
    base = type(scheduler)

    class StepReporting(base):
        @functools.wraps(base.set_timesteps)     # keeps the signature diffusers' retrieve_timesteps inspects
        def set_timesteps(self, *args, **kwargs):
            out = super().set_timesteps(*args, **kwargs)
            session.start_call(len(self.timesteps))
            return out

        def step(self, *args, **kwargs):
            return_dict = kwargs.pop("return_dict", True)
            out = super().step(*args, return_dict=True, **kwargs)
            given = dict(zip(("model_output", "timestep", "sample"), args), **kwargs)
            session.end_step(given["timestep"], out.prev_sample)
            return out if return_dict else out.to_tuple()

    StepReporting.__name__ = StepReporting.__qualname__ = base.__name__
    return StepReporting.from_config(scheduler.config)


class capture:  # noqa: N801  (used as a function: ``with capture(pipe, ...) as acts``)
    """Capture activations from the pipeline calls made inside a ``with`` block.

    :param pipe: a loaded diffusers pipeline of a known family (:mod:`probes.diffusion.families`).
    :param layers: layer names or glob patterns over the family's registry (``"*"``: the default
        layers, for SD v1.x the 16 self-attentions; ``"up*"``; ``"vae.mid"``); see
        ``diffusion-probes layers``.
    :param steps: denoising-step indices to keep (``None``: every step of the call).
    :param halves: ``cond`` (the conditional half of the CFG batch) or ``both``.
    :param dtype: dtype the activations are kept in (float32: exactly what the module returned).
    :param cfg: the CFG layout (``batched``, ``none``, ``sequential``); ``None`` reads it off the call
        (``pipe.do_classifier_free_guidance``; FLUX: ``none``, pass ``sequential`` with true CFG).
    :param height: image height the registry's token grids are given for (layer names do not
        depend on it); ``None``: the model's native size.
    :param width: likewise.
    :param compile: compile the denoiser after the hooks are registered, for the block (module
        docstring): ``True``, a ``torch.compile`` backend name, or ``torch.compile``'s keyword arguments.
    """

    def __init__(self, pipe: Any, layers: str | Sequence[str] = "*", steps: Sequence[int] | None = None,
                 halves: str = "cond", dtype: torch.dtype = torch.float32, cfg: str | None = None,
                 height: int | None = None, width: int | None = None,
                 compile: bool | str | dict[str, Any] = False) -> None:  # noqa: A002  (torch.compile's name)
        family = family_of(pipe)
        denoiser = getattr(pipe, family.denoiser)
        if hasattr(denoiser, "_orig_mod"):
            raise ValueError(f"pipe.{family.denoiser} is already compiled: hooks added to compiled code that has run are "
                             f"never called. Pass the plain module and capture(..., compile=True): it "
                             f"compiles the denoiser after registering the hooks")
        native = native_size(pipe)
        registry = pipeline_registry(pipe, height or native[0], width or native[1])
        chosen = registry.select([layers] if isinstance(layers, str) else list(layers))
        self.pipe, self.denoiser, self.attr = pipe, denoiser, family.denoiser
        self.compile = ({} if compile is True else {"backend": compile} if isinstance(compile, str)
                        else dict(compile) if isinstance(compile, dict) else None)
        self.acts = CapturedActivations(chosen, halves)
        self.session = _Session(pipe, denoiser, chosen, steps, halves, dtype, cfg, self.acts)

    def __enter__(self) -> CapturedActivations:
        s = self.session
        s.open = True
        self._handles = [self.denoiser.get_submodule(path).register_forward_hook(s.forward_hook(k))
                         for k, path in enumerate(s.paths)]
        self._handles.append(self.denoiser.register_forward_pre_hook(s.pre_hook))
        self._scheduler = self.pipe.scheduler
        self.pipe.scheduler = _reporting_scheduler(self._scheduler, s)
        if self.compile is not None:          # after the hooks: compiled code keeps what it was traced with
            setattr(self.pipe, self.attr, torch.compile(self.denoiser, **self.compile))
        return self.acts

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self.pipe.scheduler = self._scheduler
        if self.compile is not None:
            setattr(self.pipe, self.attr, self.denoiser)
        unfinished = self.session.cap is not None and self.session.step > 0
        self.session.cap, self.session.open = None, False
        if exc_type is None and unfinished:
            raise HookNeverFired("a pipeline call inside the capture block did not finish its denoising loop "
                                 "(was pipe.scheduler replaced inside the block?): set the scheduler before "
                                 "entering `with capture(pipe, ...)`")
