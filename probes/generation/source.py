"""Where a store's samples come from: sampled from noise (the protocol) or renders noised to every
step (the toy world's exact-label protocol), chosen by ``generation.start``.

One entry point for the stages that fill a store (:mod:`probes.store.fill`, the streaming dataset),
so they read the same batches whichever the source.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from probes.diffusion.layers import LayerInfo
from probes.generation.renders import noised_renders
from probes.generation.sampling import CaptureSpec, GeneratedBatch, GenerationSpec, generate
from probes.prompts.sets import PromptRecord


def store_batches(pipe, records: Sequence[PromptRecord], todo: Sequence[int], spec: GenerationSpec,
                  layers: Sequence[LayerInfo], capture: CaptureSpec, **kwargs: Any) -> Iterator[GeneratedBatch]:
    """:func:`probes.generation.sampling.generate`'s batches, or :func:`probes.generation.renders.noised_renders`'
    for ``generation.start=renders`` (same arguments)."""
    produce = noised_renders if spec.start == "renders" else generate
    return produce(pipe, records, todo, spec, layers, capture, **kwargs)
