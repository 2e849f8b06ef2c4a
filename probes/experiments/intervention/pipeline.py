"""One guided pipeline call with step-aware hook objects (editor, capture), gradients allowed.

:func:`probes.generation.sampling.generate` runs the pipeline under ``inference_mode``, which is
right for capture but forbids what the editor does inside its hooks (autograd on the activation).
This is the same call, built from the same pieces (the sampler from ``make_scheduler``, the
family's call with the reference's initial latents from ``pipeline_kwargs``, the pipeline's
precision from ``denoising``:
one precision path, so ``diffusion.precision`` means the same here), under ``no_grad`` instead,
with any number of hook objects: each is entered (its hooks registered, in
the order given, so an editor listed before a capture is captured edited) and receives the
pipeline's ``callback_on_step_end``. Without hooks it gives the same image as ``generate``,
bit for bit (tested), so an intervention's original image is the one the probes were built on.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, Protocol

import numpy as np

from probes.generation.sampling import GenerationSpec, denoising, make_scheduler, pipeline_kwargs
from probes.prompts.sets import PromptRecord


class StepHooks(Protocol):
    """What :func:`sample_images` needs of a hook object (``ActivationEditor``, ``ActivationCapture``)."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> None: ...
    def reset(self) -> None: ...
    def on_step_end(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict: ...


def sample_images(pipe, records: Sequence[PromptRecord], spec: GenerationSpec,
                  hooks: Sequence[StepHooks] = ()) -> np.ndarray:
    """Generate ``records`` (one batch) with ``hooks`` active; uint8 images ``[B, H, W, 3]``."""
    pipe.scheduler = make_scheduler(pipe, spec.scheduler)

    def on_step_end(pipe_: Any, i: int, t: Any, kwargs: dict) -> dict:
        for h in hooks:
            kwargs = h.on_step_end(pipe_, i, t, kwargs)
        return kwargs

    with ExitStack() as stack:
        for h in hooks:
            h.reset()
            stack.enter_context(h)
        # no_grad, not inference_mode: the editor runs autograd inside its hooks
        with denoising(pipe, autograd_in_hooks=True):
            out = pipe(**pipeline_kwargs(pipe, [r.prompt for r in records], [r.seed for r in records], spec,
                                         on_step_end))
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
