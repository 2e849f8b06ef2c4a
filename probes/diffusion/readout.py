"""Readout rules: how a hooked module's output becomes ``[batch, tokens, channels]`` of image tokens.

A probe needs, per layer, one feature vector per cell of a spatial grid. A U-Net's self-attention
hands that over as is (``[B, h*w, C]``), but a diffusion transformer's blocks do not: an MMDiT
block (SD3, FLUX's double-stream blocks) returns a *pair* of token streams, text and image; a
FLUX single-stream block runs one stream of text tokens followed by image tokens; an attention
module returns its pair in the other order than the block around it. A layer is therefore a
module path **plus** the rule that picks its image tokens, and the rule is named by a short
string so that it can travel in manifests and exports (:data:`READOUTS`).

Each rule also writes: ``rule.write(out, layer, tokens)`` is the module output with its image tokens
replaced by ``tokens`` and everything else (the text stream, the text tokens of a single stream)
as it was, the inverse the intervention needs to put edited image tokens back where the next
module reads them (``rule(rule.write(out, layer, x), layer)`` is ``x``; tested per rule).

Tuple orders in diffusers 0.42.1, checked against the installed version by
``tests/unit/test_family_layers.py`` (each block's image tokens are what the model hands the next
block as ``hidden_states``):

==================================  ===========================  ==============  ================
module                              returns                      image tokens    rule
==================================  ===========================  ==============  ================
U-Net ``…attn1.to_out.0``            ``[B, N, C]``                all             ``tokens``
PixArt ``transformer_blocks.i``      ``[B, N, C]``                all             ``tokens``
SD3 ``JointTransformerBlock``        ``(text | None, image)``     second          ``second``
FLUX ``FluxTransformerBlock``        ``(text, image)``            second          ``second``
FLUX ``FluxSingleTransformerBlock``  ``(text, image)``; older      second; the     ``after_text``
                                     releases one tensor          last N tokens
                                     ``[B, T + N, C]`` (*)
SD3/FLUX ``….attn`` (joint)          ``(image, text)``            first           ``first``
FLUX single ``….attn``               ``[B, T + N, C]``            the last N      ``after_text``
U-Net ResNets, samplers              ``[B, C, h, w]``             all             ``channels_first``
==================================  ===========================  ==============  ================

(*) diffusers split the single-stream output into a pair with its block-cache work of mid-2025
(see huggingface/diffusers issue #12071); ``after_text`` reads either form.

Every rule checks the token and channel counts against the layer's grid and fails with the shapes
it saw, so a diffusers release that reorders a tuple stops a run instead of filling a store with
text tokens.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class _Layer(Protocol):
    name: str
    module: str
    channels: int

    @property
    def tokens(self) -> int: ...


def _check(x: torch.Tensor, layer: _Layer, what: str) -> torch.Tensor:
    if x.ndim != 3 or x.shape[1] != layer.tokens or x.shape[2] != layer.channels:
        raise RuntimeError(f"layer {layer.name} ({layer.module}): {what} has shape {tuple(x.shape)}; expected "
                           f"[batch, {layer.tokens}, {layer.channels}] (is the resolution in the config the one "
                           f"generated? did the installed diffusers change the module's outputs?)")
    return x


def _shapes(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_shapes(o) for o in out) + ")"
    return type(out).__name__


class Readout:
    """One rule; ``rule(output, layer)`` is the image tokens ``[batch, layer.tokens, layer.channels]``."""

    name = ""

    def __call__(self, out: Any, layer: _Layer) -> torch.Tensor:
        raise NotImplementedError

    def write(self, out: Any, layer: _Layer, tokens: torch.Tensor) -> Any:
        """``out`` with its image tokens replaced by ``tokens`` (same shape), the rest untouched."""
        raise NotImplementedError


class Tokens(Readout):
    """The output is already the image tokens (U-Net self-attention, PixArt blocks)."""

    name = "tokens"

    def __call__(self, out: Any, layer: _Layer) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}, not one tensor of "
                               f"tokens: it needs another readout rule")
        return _check(out, layer, "the output")

    def write(self, out: Any, layer: _Layer, tokens: torch.Tensor) -> Any:
        self(out, layer)
        return tokens.to(out.dtype)


class PairItem(Readout):
    """One tensor of a ``(a, b)`` pair of token streams. The other item is allowed to be ``None`` (the
    last SD3 block returns no text stream)."""

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name

    def __call__(self, out: Any, layer: _Layer) -> torch.Tensor:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}; the {self.name!r} "
                               f"readout expects a pair (text, image) or (image, text)")
        x = out[self.index]
        other = out[1 - self.index]
        if (isinstance(other, torch.Tensor) and other.ndim == 3 and other.shape[1] == layer.tokens
                and (not isinstance(x, torch.Tensor) or x.shape[1] != layer.tokens)):
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}: the image tokens "
                               f"({layer.tokens}) are item {1 - self.index}, not {self.index}: the installed diffusers "
                               f"orders this module's outputs otherwise; the family's readout table needs updating")
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}: item {self.index} is "
                               f"not a tensor")
        return _check(x, layer, f"item {self.index} of its output")

    def write(self, out: Any, layer: _Layer, tokens: torch.Tensor) -> Any:
        x = self(out, layer)
        items = list(out)
        items[self.index] = tokens.to(x.dtype)
        return type(out)(items)


class AfterText(Readout):
    """The image tokens of a single stream that runs text tokens first, then image tokens (FLUX's
    single-stream blocks). Recent diffusers split the stream into ``(text, image)`` itself; older
    releases returned the concatenation ``[B, T + N, C]``, of which the last ``N`` are the image's."""

    name = "after_text"

    def __call__(self, out: Any, layer: _Layer) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            return PairItem(1, self.name)(out, layer)
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[1] < layer.tokens:
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}; expected text then "
                               f"{layer.tokens} image tokens")
        return _check(out[:, out.shape[1] - layer.tokens:], layer, "its last tokens")

    def write(self, out: Any, layer: _Layer, tokens: torch.Tensor) -> Any:
        if isinstance(out, (tuple, list)):
            return PairItem(1, self.name).write(out, layer, tokens)
        self(out, layer)
        return torch.cat([out[:, :out.shape[1] - layer.tokens], tokens.to(out.dtype)], 1)


class ChannelsFirst(Readout):
    """A feature map ``[B, C, h, w]`` (U-Net ResNets and samplers), read as tokens in row-major order."""

    name = "channels_first"

    def __call__(self, out: Any, layer: _Layer) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise RuntimeError(f"layer {layer.name} ({layer.module}) returned {_shapes(out)}; the "
                               f"{self.name!r} readout expects [batch, channels, h, w]")
        return _check(out.flatten(2).transpose(1, 2), layer, "the flattened feature map")

    def write(self, out: Any, layer: _Layer, tokens: torch.Tensor) -> Any:
        self(out, layer)
        return tokens.to(out.dtype).transpose(1, 2).reshape(out.shape)


#: every rule, by the name a :class:`~probes.diffusion.layers.LayerInfo` carries (``readout``)
READOUTS: dict[str, Readout] = {r.name: r for r in (Tokens(), PairItem(0, "first"), PairItem(1, "second"),
                                                    AfterText(), ChannelsFirst())}


def readout_rule(name: str) -> Readout:
    try:
        return READOUTS[name]
    except KeyError:
        raise ValueError(f"unknown readout rule {name!r}; valid rules: {', '.join(READOUTS)}") from None


def read_tokens(layer: Any, out: Any) -> torch.Tensor:
    """``layer``'s image tokens ``[batch, tokens, channels]`` from its module's output ``out``."""
    return readout_rule(getattr(layer, "readout", "tokens"))(out, layer)


def write_tokens(layer: Any, out: Any, tokens: torch.Tensor) -> Any:
    """``out`` (``layer``'s module output) with its image tokens replaced by ``tokens``."""
    return readout_rule(getattr(layer, "readout", "tokens")).write(out, layer, tokens)


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[..., h*w, C]`` -> ``[..., h, w, C]``: tokens are in row-major order on every family's grid
    (U-Net feature maps flattened; SD3/PixArt patch embeddings; FLUX's 2x2 packing)."""
    h, w = grid
    if tokens.shape[-2] != h * w:
        raise ValueError(f"{tokens.shape[-2]} tokens do not fill a {h}x{w} grid")
    return tokens.reshape(*tokens.shape[:-2], h, w, tokens.shape[-1])
