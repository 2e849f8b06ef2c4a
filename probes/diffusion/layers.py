"""Layer registry: the self-attention layers of an SD-family U-Net, with stable short names.

Names are what people type in configs and read in dashboards, so they are short and stable:
``down{block}.{attention}``, ``mid.{attention}``, ``up{block}.{attention}`` (plus
``.{transformer_block}`` when a transformer has more than one block, as in SDXL). Each entry
records the hooked module (``attn1.to_out.0``: the attention's output projection, before dropout
and the residual add), its channel count and its token grid at the configured resolution.

Those 16 self-attention outputs are all the probes of Chen et al. need, and they stay the
registry's default. The semantic lens (Bonechi et al. 2025) asks which *layer* of the U-Net keeps
an object's meaning, so ``from_unet(..., kinds=ALL_KINDS)`` registers every other readable output
too, each with its channels and its grid (the grid of the module's *output*):

=============  ==============================  ====================================================
kind           names                           hooked module (its output)
=============  ==============================  ====================================================
``attn1``      ``down0.0`` … ``up3.2``         ``….attentions.i.transformer_blocks.j.attn1.to_out.0``
               (unchanged, tokens ``[B, N, C]``)  the self-attention, before dropout and residual
``res``        ``down0.res0``, ``mid.res1``    ``….resnets.i``: a ResNet block, ``[B, C, h, w]``
``attn``       ``down0.attn0``, ``up1.attn2``  ``….attentions.i``: the whole Transformer2DModel
                                                (proj_in, self/cross-attention, MLP, proj_out,
                                                residual)
``sampler``    ``down0.downsample``,           ``….downsamplers.0`` / ``….upsamplers.0``: output
               ``up1.upsample``                 at the *next* level's grid
``out``        ``down0.out``, ``mid.out``,     the block itself: what it hands the next block
               ``up3.out``                      (after its sampler, if any)
=============  ==============================  ====================================================

Beware the two "attention" names: ``down0.attn1`` is the block's *second* Transformer2DModel,
``down0.1`` the self-attention (diffusers' ``attn1``) *inside* it. :data:`NAMING` is the one mapping
from names to modules (errors quote it, the README shows it). A block with a sampler hands
the sampler's output on, so ``down0.out`` and ``down0.downsample`` are the same tensor (both names
are kept: one says "block output", the other "sampler"; the lens skips such duplicates when it
combines layers).

**The VAE decoder's probe** (``vae.mid``, kind ``vae``): the reference also probed the VAE
decoder's mid-block self-attention on the partially denoised latent. It is registered by
:meth:`LayerRegistry.from_pipeline` with the hooked module's path *relative to the pipeline*
(``vae.decoder.mid_block.attentions.0.to_out.0``: the attention's output projection, before the
residual, as for the U-Net layers), tokens = the latent grid, channels = the VAE's mid-block
width. The U-Net never runs it: :class:`probes.generation.capture.ActivationCapture` runs the
decoder's ``post_quant_conv``, ``conv_in`` and ``mid_block`` on each step's latent. It is
**opt-in**: ``*`` and other wildcards keep meaning the U-Net's layers; only a pattern that starts
with ``vae`` (``vae.mid``, ``vae.*``) selects it.

Which name is "the first encoder layer at 16x16" (the lens paper's best layer) depends on the
model and its resolution, and on what one counts as a layer; :func:`first_at_grid` lists the
candidates in forward order:

- **SD v1.4 at 512 px** (latent 64x64; down blocks at 64, 32, 16, 8): the first module whose
  output is 16x16 is ``down1.downsample`` (= ``down1.out``); the first layer *computed at* 16x16
  is ``down_blocks.2``: ``down2.res0`` (ResNet), ``down2.0`` (self-attention), ``down2.attn0``
  (transformer), channels 1280.
- **The toy model** (64 px images, 4x VAE, latent 16x16; grids 16, 8, 4, 2): the first encoder
  level is already 16x16, so the same readings are ``down0.res0``, ``down0.0``, ``down0.attn0``
  (``down_blocks.0``); the tiny random test model (128 px, 8x VAE) has the same grids.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch.nn as nn

from probes.common.registry import Registry, UnknownName
from probes.diffusion.readout import READOUTS

_ATTN1 = re.compile(r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")


#: every kind of layer the registry knows (see the module docstring); ``attn1`` is the default
ALL_KINDS: tuple[str, ...] = ("attn1", "res", "attn", "sampler", "out")
#: the VAE decoder's layers: kind, name prefix, and the one registered name (see the module docstring)
VAE_KIND, VAE_PREFIX, VAE_MID = "vae", "vae.", "vae.mid"
#: the hooked module of ``vae.mid``, relative to the pipeline
VAE_MID_MODULE = "vae.decoder.mid_block.attentions.0.to_out.0"
#: The one mapping from a layer name to what it reads, per kind: (kind, name pattern, last part of
#: the name, hooked module). Names are ``<block>.<last part>`` with ``<block>`` = ``down<b>``, ``mid``
#: or ``up<b>``. Note the two attentions: ``down0.1`` is the self-attention *inside* the block's second
#: transformer (diffusers' ``attn1``, what the probes read), ``down0.attn1`` that whole transformer.
NAMING: tuple[tuple[str, str, str, str], ...] = (
    ("attn1", "<block>.<i>[.<j>]", r"^\d+$",
     "attentions.<i>.transformer_blocks.<j>.attn1.to_out.0 (self-attention, before dropout and residual)"),
    ("res", "<block>.res<i>", r"^res\d+$", "resnets.<i> (ResNet block)"),
    ("attn", "<block>.attn<i>", r"^attn\d+$", "attentions.<i> (the whole Transformer2DModel)"),
    ("sampler", "down<b>.downsample, up<b>.upsample", r"^(?:downsample|upsample)$", "downsamplers.0 / upsamplers.0"),
    ("out", "<block>.out", r"^out$", "the block itself (what it hands the next block)"),
    ("vae", "vae.mid", r"^mid$", "vae.decoder.mid_block.attentions.0.to_out.0 (opt-in)"),
)
_KIND_OF_SUFFIX = {kind: re.compile(rx) for kind, _, rx, _ in NAMING if kind != "vae"}
#: the diffusion transformers' names (:mod:`probes.diffusion.families.layers`): ``joint7`` (a block,
#: kind ``block``) and ``joint7.attn`` (its attention output, kind ``attn``)
TRANSFORMER_NAME = re.compile(r"^(joint|single|block)(\d+)(\.attn)?$")


def naming_table() -> str:
    """:data:`NAMING` as text (errors and ``--help`` show it)."""
    return "; ".join(f"{pattern} = {module}" for _, pattern, _, module in NAMING)


def kind_of(name: str) -> str:
    """The kind of a registered name, read off the name itself (``down2.res0`` -> ``res``), so
    that :class:`LayerInfo` and the manifests it is written into keep their fields. A layer
    someone registered under another name is of kind ``custom``."""
    if name.startswith(VAE_PREFIX):
        return VAE_KIND
    m = TRANSFORMER_NAME.match(name)
    if m:
        return "attn" if m.group(3) else "block"
    last = name.rsplit(".", 1)[-1]
    return next((kind for kind, rx in _KIND_OF_SUFFIX.items() if rx.match(last)), "custom")


@dataclass(frozen=True)
class LayerInfo:
    """One probe-able layer. ``module`` is the path of the module whose output is captured, and
    ``readout`` the rule that turns that output into image tokens ``[batch, tokens, channels]``
    (:data:`probes.diffusion.readout.READOUTS`): ``tokens`` for the U-Net's self-attentions, which
    return them as they are; a diffusion transformer's block returns a pair of token streams, or text
    tokens followed by image tokens, and its layers name the rule that picks the image's."""

    name: str
    module: str
    channels: int
    grid: tuple[int, int]
    readout: str = "tokens"

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"layer {self.name}: unknown readout rule {self.readout!r}; valid: {', '.join(READOUTS)}")

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kind(self) -> str:
        """``attn1``, ``res``, ``attn``, ``sampler``, ``out`` or ``vae`` (see the module docstring)."""
        return kind_of(self.name)

    @property
    def in_vae(self) -> bool:
        """Read from the VAE decoder (``module`` is relative to the pipeline), not from the U-Net."""
        return self.kind == VAE_KIND

    def to_dict(self) -> dict:
        """The fields, with ``readout`` only when it is not ``tokens`` (so that a U-Net layer's dict,
        in the manifests and exports written before the rule existed, stays what it was)."""
        d = asdict(self)
        d["grid"] = list(self.grid)
        if self.readout == "tokens":
            d.pop("readout")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(name=d["name"], module=d["module"], channels=int(d["channels"]), grid=tuple(d["grid"]),
                   readout=d.get("readout", "tokens"))


def _block_resolutions(unet: nn.Module, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Token grid of each block, by walking the down/up samplers as the forward pass does."""
    h, w = latent_hw
    res: dict[str, tuple[int, int]] = {}
    for b, block in enumerate(unet.down_blocks):
        res[f"down{b}"] = (h, w)
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # stride-2 conv, padding 1
    res["mid"] = (h, w)
    for b, block in enumerate(unet.up_blocks):
        res[f"up{b}"] = (h, w)
        if getattr(block, "upsamplers", None):
            h, w = h * 2, w * 2
    return res


#: the 16 self-attention layers of SD v1.x, in forward order (what "all layers" means in the protocol)
SD14_LAYERS = ("down0.0", "down0.1", "down1.0", "down1.1", "down2.0", "down2.1", "mid.0",
               "up1.0", "up1.1", "up1.2", "up2.0", "up2.1", "up2.2", "up3.0", "up3.1", "up3.2")
_NAME_SYNTAX = re.compile(r"^(down\d+\.\d+|mid\.\d+|up\d+\.\d+)(\.\d+)?$")


def _plausible_names(kinds: Iterable[str] = ("attn1",)) -> list[str]:
    """Names any SD-family U-Net can have (4 blocks, up to 3 attentions, optional transformer depth)."""
    kinds = set(kinds)
    names = [f"{k}{b}.{a}" for k in ("down", "up") for b in range(4) for a in range(3)] + ["mid.0"]
    out = names + [f"{n}.{d}" for n in names for d in range(10)] if "attn1" in kinds else []
    prefixes = [f"{k}{b}" for k in ("down", "up") for b in range(4)] + ["mid"]
    if "res" in kinds:
        out += [f"{p}.res{i}" for p in prefixes for i in range(4)]
    if "attn" in kinds:
        out += [f"{p}.attn{i}" for p in prefixes for i in range(4)]
    if "sampler" in kinds:
        out += [f"down{b}.downsample" for b in range(4)] + [f"up{b}.upsample" for b in range(4)]
    if "out" in kinds:
        out += [f"{p}.out" for p in prefixes]
    return out


def check_layer_patterns(patterns: str | Iterable[str], kinds: Iterable[str] = ("attn1",),
                         option: str = "capture.layers") -> None:
    """Fail at config time on a layer pattern no SD-family U-Net can match (typos like ``upp3.0``).

    Which of the plausible layers a model really has is checked again once it is loaded
    (:meth:`LayerRegistry.select`); this catches misspellings before any compute. ``kinds`` widens
    the names accepted to other kinds of layer (the lens reads ResNets, transformers, samplers
    and block outputs too); ``option`` is the config key named in the error.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    kinds = tuple(kinds)
    universe = _plausible_names(kinds) + [VAE_MID]
    for pat in pats:
        if pat in ("all", "*") or "blocks" in pat:   # "all", or a module-path pattern
            continue
        if "attn" in pat and (kinds == ("attn1",) or "." not in pat):   # a module-path pattern like '*attn1*'
            continue
        if not any(fnmatch.fnmatchcase(n, pat) for n in universe):
            extra = f" (every kind: {naming_table()})" if set(kinds) - {"attn1"} else ""
            raise ValueError(f"{option}: {pat!r} names no layer; layers are named down<block>.<attention>, "
                             f"mid.0, up<block>.<attention> (SD v1.4: {', '.join(SD14_LAYERS)}){extra}, and "
                             f"{VAE_MID} (the VAE decoder's mid-block attention); patterns like 'up*' or module paths "
                             f"like 'up_blocks.3.*' also work")


class LayerRegistry:
    """Ordered (forward order) set of layers; unknown names fail loudly with the valid ones.

    :param family: the model family the layers belong to (:mod:`probes.diffusion.families`), named in
        the errors; ``None`` for a registry of unstated origin (an export's layers).
    """

    def __init__(self, layers: Iterable[LayerInfo] = (), family: str | None = None) -> None:
        self.family = family
        #: forward order; a name registered twice is refused (two layers would share a probe's key)
        self._layers: Registry[LayerInfo] = Registry("layer", on_overwrite="refuse", ordered=True)
        for layer in layers:
            self.register(layer)

    @classmethod
    def from_unet(cls, unet: nn.Module, latent_hw: tuple[int, int],
                  kinds: Iterable[str] = ("attn1",)) -> LayerRegistry:
        """Discover the U-Net's layers at the given latent size, in forward order.

        By default only the self-attentions (``attn1``), as the probes use them; ``kinds`` adds
        ResNets, transformers, samplers and block outputs (:data:`ALL_KINDS`, module docstring).
        """
        kinds = tuple(kinds)
        bad = sorted(set(kinds) - set(ALL_KINDS))
        if bad:
            raise ValueError(f"unknown layer kinds {bad}; valid kinds: {', '.join(ALL_KINDS)}")
        attn1 = cls._attn1_layers(unet, latent_hw)
        if kinds == ("attn1",):
            return attn1
        return cls._all_layers(unet, latent_hw, kinds, attn1)

    @classmethod
    def from_pipeline(cls, pipe, latent_hw: tuple[int, int], kinds: Iterable[str] = ("attn1",)) -> LayerRegistry:
        """:meth:`from_unet` on ``pipe.unet``, plus the VAE decoder's ``vae.mid`` when the VAE has
        a mid-block attention (opt-in: see the module docstring)."""
        reg = cls.from_unet(pipe.unet, latent_hw, kinds)
        vae = getattr(pipe, "vae", None)
        if vae is not None and vae_mid_channels(vae) is not None:
            reg.register(vae_mid_layer(vae_mid_channels(vae), latent_hw))
        return reg

    @classmethod
    def _attn1_layers(cls, unet: nn.Module, latent_hw: tuple[int, int]) -> LayerRegistry:
        grids = _block_resolutions(unet, latent_hw)
        found: dict[str, list[tuple[int, int, str, nn.Module]]] = {}
        for path, module in unet.named_modules():
            m = _ATTN1.match(path)
            if not m:
                continue
            kind, block, attn, tb = m.groups()
            prefix = f"{kind}{block}" if kind else "mid"
            found.setdefault(prefix, []).append((int(attn), int(tb), path, module))
        order = [f"down{b}" for b in range(len(unet.down_blocks))] + ["mid"] + \
                [f"up{b}" for b in range(len(unet.up_blocks))]
        reg = cls()
        for prefix in order:
            entries = sorted(found.get(prefix, []), key=lambda e: (e[0], e[1]))
            depth = max((e[1] for e in entries), default=0) + 1
            for attn, tb, path, module in entries:
                name = f"{prefix}.{attn}" if depth == 1 else f"{prefix}.{attn}.{tb}"
                reg.register(LayerInfo(name=name, module=f"{path}.to_out.0",
                                       channels=int(module.to_out[0].out_features), grid=grids[prefix]))
        if not len(reg):
            raise ValueError("no self-attention (attn1) layers found: is this an SD-family UNet2DConditionModel?")
        return reg

    @classmethod
    def _all_layers(cls, unet: nn.Module, latent_hw: tuple[int, int], kinds: tuple[str, ...],
                    attn1: LayerRegistry) -> LayerRegistry:
        """Every requested kind, block by block in the order the forward pass produces them."""
        grids = _block_resolutions(unet, latent_hw)
        attn1_of: dict[str, list[LayerInfo]] = {}
        for info in attn1:
            path = info.module.split(".transformer_blocks.")[0]       # the Transformer2DModel
            attn1_of.setdefault(path, []).append(info)
        blocks = [(f"down{b}", f"down_blocks.{b}", blk, "down") for b, blk in enumerate(unet.down_blocks)]
        blocks.append(("mid", "mid_block", unet.mid_block, "mid"))
        blocks += [(f"up{b}", f"up_blocks.{b}", blk, "up") for b, blk in enumerate(unet.up_blocks)]
        reg = cls()
        for prefix, path, block, side in blocks:
            if block is None:
                continue
            grid = grids[prefix]
            resnets = list(getattr(block, "resnets", None) or [])
            attentions = list(getattr(block, "attentions", None) or [])
            channels = int(resnets[-1].out_channels) if resnets else None
            # a mid block runs resnet0, then (attention_i, resnet_i+1); a down/up block (resnet_i, attention_i)
            order: list[tuple[str, int]] = []
            if side == "mid":
                order.append(("res", 0))
                for i in range(len(attentions)):
                    order += [("attn", i), ("res", i + 1)]
            else:
                for i in range(len(resnets)):
                    order.append(("res", i))
                    if i < len(attentions):
                        order.append(("attn", i))
            for kind, i in order:
                if kind == "res" and "res" in kinds:
                    reg.register(LayerInfo(f"{prefix}.res{i}", f"{path}.resnets.{i}",
                                           int(resnets[i].out_channels), grid))
                if kind == "attn":
                    if "attn1" in kinds:
                        for info in attn1_of.get(f"{path}.attentions.{i}", []):
                            reg.register(info)
                    if "attn" in kinds:
                        reg.register(LayerInfo(f"{prefix}.attn{i}", f"{path}.attentions.{i}",
                                               int(attentions[i].out_channels), grid))
            sampler_grid = grid
            for attr, name in (("downsamplers", "downsample"), ("upsamplers", "upsample")):
                samplers = getattr(block, attr, None)
                if not samplers:
                    continue
                # as _block_resolutions walks the forward pass: down halves (ceil), up doubles
                sampler_grid = ((math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)) if side == "down"
                                else (grid[0] * 2, grid[1] * 2))
                channels = int(samplers[0].out_channels)
                if "sampler" in kinds:
                    reg.register(LayerInfo(f"{prefix}.{name}", f"{path}.{attr}.0", channels, sampler_grid))
            if "out" in kinds and channels is not None:
                reg.register(LayerInfo(f"{prefix}.out", path, channels, sampler_grid))
        if not len(reg):
            raise ValueError(f"no layers of kinds {list(kinds)} found: is this an SD-family UNet2DConditionModel?")
        return reg

    def register(self, layer: LayerInfo) -> None:
        """Add a layer (e.g. a cross-attention or a VAE attention someone wants to probe)."""
        self._layers.register(layer.name, layer)

    def names(self) -> list[str]:
        return self._layers.list()

    def list(self, pattern: str = "*") -> list[str]:
        """Names (forward order) whose short name or module path matches the fnmatch pattern.

        The VAE's layers only answer patterns that start with ``vae`` (opt-in), so ``*`` and
        ``up*`` keep meaning the U-Net's layers.
        """
        return [n for n, info in self._items()
                if (not info.in_vae or pattern.startswith("vae"))
                and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(info.module, pattern))]

    def get(self, name: str) -> LayerInfo:
        if self.family and name not in self._layers:
            raise UnknownName(f"unknown layer {name!r} for model family {self.family}; valid layers: "
                              f"{', '.join(self.names())}")
        return self._layers.get(name)

    def select(self, patterns: str | Iterable[str] = "*") -> list[LayerInfo]:
        """Layers matching any pattern, in forward order. A pattern that matches nothing is an error."""
        if isinstance(patterns, str):
            patterns = ["*"] if patterns == "all" else [patterns]
        chosen: set[str] = set()
        for pat in patterns:
            hits = self.list(pat)
            if not hits:
                of = f" of model family {self.family}" if self.family else ""
                examples = ("'up*' or 'up_blocks.3.*'" if not self.names() or not TRANSFORMER_NAME.match(self.names()[0])
                            else "'joint*' or 'transformer_blocks.1*'")
                raise KeyError(f"layer {pat!r} matches no layer{of}; valid layers: {', '.join(self.names())} "
                               f"(patterns like {examples} also work)")
            chosen.update(hits)
        return [info for n, info in self._items() if n in chosen]

    def at_grid(self, grid: tuple[int, int], kinds: Iterable[str] = ALL_KINDS) -> list[str]:
        """Names (forward order) of the registered layers of ``kinds`` whose output grid is ``grid``."""
        kinds = set(kinds)
        return [n for n, info in self._items() if tuple(info.grid) == tuple(grid) and info.kind in kinds]

    def __iter__(self):
        return iter(self._layers.values())

    def _items(self) -> list[tuple[str, LayerInfo]]:
        return list(zip(self._layers.list(), self._layers.values()))

    def __len__(self) -> int:
        return len(self._layers)


def vae_mid_channels(vae: nn.Module) -> int | None:
    """Channels of the VAE decoder's mid-block attention (None when it has none, e.g.
    ``mid_block_add_attention: false``)."""
    attentions = getattr(getattr(getattr(vae, "decoder", None), "mid_block", None), "attentions", None)
    if not attentions or attentions[0] is None:
        return None
    return int(attentions[0].to_out[0].out_features)


def vae_mid_layer(channels: int, latent_hw: tuple[int, int]) -> LayerInfo:
    """``vae.mid``: the decoder's mid-block self-attention, at the latent's grid (the decoder's
    ``conv_in`` and mid block keep the latent's size)."""
    return LayerInfo(VAE_MID, VAE_MID_MODULE, int(channels), (int(latent_hw[0]), int(latent_hw[1])))


def first_at_grid(registry: LayerRegistry, grid: tuple[int, int]) -> dict[str, str]:
    """Every reading of "the first encoder layer at ``grid``", by kind: the first name of each kind
    on the encoder side (``down*``) whose output has that grid. ``"first_output"`` is the first
    encoder module of any kind producing that grid (for SD v1.4 at 16x16, ``down1.downsample``)."""
    encoder = [info for info in registry if info.name.startswith("down") and tuple(info.grid) == tuple(grid)]
    out: dict[str, str] = {}
    if encoder:
        out["first_output"] = encoder[0].name
    for info in encoder:
        out.setdefault(info.kind, info.name)
    return out
