"""Denoiser features of real images: image -> VAE latent -> noise to t -> one denoiser pass -> hooks.

Any model family (:mod:`probes.diffusion.families`): the U-Nets' layers of every kind, the
diffusion transformers' blocks and attention outputs (read through their readout rules, so a
block's image tokens, not its text stream, become the feature map); the pass itself is
:func:`probes.diffusion.families.forward.denoiser_pass`, and flow-matching models (SD3, FLUX) are
noised along their straight line ``(1 - sigma) x_0 + sigma noise`` with ``sigma = t / 1000``.

The semantic lens reads what the U-Net "sees" in an existing image, not in one it generates, so
there is no sampling loop here: the image is encoded (``latent_dist.mean`` x the VAE's scaling
factor, the latent the U-Net was trained on), forward-noised to the feature timestep ``t`` with
the training noise schedule (``add_noise`` of a DDPM scheduler built from the pipeline's scheduler
config, so any sampler the pipeline ships with gives the same ``alphas_cumprod``), and passed once
through the U-Net with a fixed prompt (empty by default). Forward hooks on the registered layers
(:mod:`probes.diffusion.layers`) collect every layer's output as a feature map ``[B, C, h, w]``.

``denoise_steps = k > 0`` instead starts from the noise level ``denoise_from`` (img2img style:
the image noised to ``denoise_from``) and takes ``k`` deterministic DDIM steps down to ``t``
before the feature pass, so the features are always read at the same ``t`` and a step sweep
measures what the denoising steps themselves change, not a change of timestep.

Noise is seeded per image *key* (by default the item id), not per batch position: an image gets
the same noise whatever batch it lands in and whether or not it was transformed, so a
transformation's effect is not mixed with a change of noise, and a resumed run recomputes the
same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn

from probes.common.hashing import sha256_text
from probes.diffusion.families.forward import denoiser_pass, encode_condition, flow_sigma
from probes.diffusion.families.layers import TRANSFORMER_KINDS, denoiser_registry, latent_hw, token_stride
from probes.diffusion.families.spec import Family, family_of
from probes.diffusion.families.spec import native_size as family_native_size
from probes.diffusion.hooks import HookNeverFired, ModuleHooks
from probes.diffusion.layers import ALL_KINDS, LayerInfo, LayerRegistry
from probes.diffusion.readout import read_tokens


@dataclass
class FeatureSpec:
    """How features are read from the U-Net.

    :param layers: layer names or fnmatch patterns over every kind of layer (``down0.res0``,
        ``down*.attn*``, ``mid.out``; see :mod:`probes.diffusion.layers`); ``all`` takes every layer.
    :param timestep: the feature pass's timestep ``t`` (0 = clean latent, up to the scheduler's
        ``num_train_timesteps - 1``).
    :param prompt: text the U-Net is conditioned on (empty by default: no caption bias).
    :param noise_seed: seed of the forward noise (combined with each image's key).
    :param denoise_steps: DDIM steps from ``denoise_from`` down to ``timestep`` before the
        feature pass (0: noise straight to ``timestep``).
    :param denoise_from: the noise level the ``denoise_steps`` start from (img2img strength x T).
    :param image_size: side the images are resized to (default: the model's native size,
        ``unet.config.sample_size x vae_scale_factor``).
    :param batch_size: images per U-Net batch.
    """

    layers: list[str] = field(default_factory=lambda: ["all"])
    timestep: int = 100
    prompt: str = ""
    noise_seed: int = 0
    denoise_steps: int = 0
    denoise_from: int = 400
    image_size: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.timestep < 0:
            raise ValueError(f"features.timestep must be >= 0, got {self.timestep}")
        if self.denoise_steps < 0:
            raise ValueError(f"features.denoise_steps must be >= 0, got {self.denoise_steps}")
        if self.denoise_steps and self.denoise_from <= self.timestep:
            raise ValueError(f"features.denoise_from ({self.denoise_from}) must be above features.timestep "
                             f"({self.timestep}): the denoising steps go from the first down to the second")
        if self.batch_size < 1:
            raise ValueError(f"features.batch_size must be >= 1, got {self.batch_size}")

    def identity(self) -> dict[str, Any]:
        """What the features depend on (the batch size does not): goes into cache fingerprints."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("layers")                       # recorded as resolved layers by the cache
        if not self.denoise_steps:
            d.pop("denoise_from")
        return d


def denoise_schedule(start: int, end: int, steps: int) -> list[int]:
    """``steps + 1`` integer timesteps from ``start`` down to ``end``, evenly spaced, both ends
    included: the k DDIM updates go from each to the next, the feature pass runs at ``end``."""
    if steps == 0:
        return [end]
    return [int(round(v)) for v in np.linspace(start, end, steps + 1)]


def noise_for(keys: Sequence[str], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise ``[len(keys), *shape]``, each row a pure function of (seed, key) (CPU, fp32)."""
    rows = []
    for key in keys:
        g = torch.Generator().manual_seed(int(sha256_text(f"{seed}:{key}", 15), 16))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square ``size x size`` RGB for the model. Images are stretched, not cropped, so every pixel
    (and every object of the mask, which is pooled on the feature grid as it is) stays in view."""
    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def native_image_size(pipe: Any) -> int:
    """The side the model was trained at: denoiser sample size x the VAE's down-sampling."""
    return family_native_size(pipe)[0]


def lens_kinds(family: Family) -> tuple[str, ...]:
    """Every kind of layer the lens reads in a family: the U-Net's :data:`ALL_KINDS`, a
    transformer's blocks and attention outputs."""
    return ALL_KINDS if family.is_unet else TRANSFORMER_KINDS


def lens_registry(pipe: Any, latent: tuple[int, int]) -> LayerRegistry:
    """Every layer the lens can read in ``pipe``'s denoiser at a latent size."""
    family = family_of(pipe)
    return denoiser_registry(family, getattr(pipe, family.denoiser), latent, lens_kinds(family))


def as_feature_map(out: Any, layer: LayerInfo) -> torch.Tensor:
    """A hooked module's output as ``[B, C, h, w]``, whatever the module returns: a tensor (ResNet,
    sampler, mid/up block), a tuple (Transformer2DModel with ``return_dict=False``, a down block's
    ``(hidden_states, skips)``), an output object with ``.sample``, or tokens ``[B, h*w, C]``
    (self-attention); a layer with another readout rule (a transformer block's pair of token streams)
    is read by its rule. The shape is checked against the registry, so a wrong resolution fails here."""
    if layer.readout != "tokens":
        tokens = read_tokens(layer, out)
        h, w = layer.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], layer.channels, h, w)
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = getattr(out, "sample", out)
    h, w = layer.grid
    if out.ndim == 3:
        if out.shape[1:] != (h * w, layer.channels):
            raise RuntimeError(f"layer {layer.name} ({layer.module}) produced tokens {tuple(out.shape)}; expected "
                               f"[batch, {h * w}, {layer.channels}]: are the images the size the registry was built for?")
        return out.transpose(1, 2).reshape(out.shape[0], layer.channels, h, w)
    if out.ndim != 4 or out.shape[1:] != (layer.channels, h, w):
        raise RuntimeError(f"layer {layer.name} ({layer.module}) produced {tuple(out.shape)}; expected "
                           f"[batch, {layer.channels}, {h}, {w}]: are the images the size the registry was built for?")
    return out


class _AllCollected(Exception):
    """Raised by the last needed hook to skip the rest of the U-Net (nothing after it is read)."""


class FeatureCapture(ModuleHooks):
    """Forward hooks that keep the output of each layer, as feature maps, during armed passes.

    Set and removed explicitly (a context manager), like :class:`probes.generation.capture.ActivationCapture`.
    Only passes run while ``armed`` is True record anything (the denoising passes before the
    feature pass do not). With ``stop_early`` the pass is cut short once every layer has fired,
    which for encoder layers saves most of the U-Net.
    """

    def __init__(self, unet: nn.Module, layers: Sequence[LayerInfo], stop_early: bool = True) -> None:
        self.unet, self.layers, self.stop_early = unet, list(layers), stop_early
        self.armed = False
        self.features: dict[str, torch.Tensor] = {}

    def hooks(self):
        return [(layer.module, self._make_hook(layer)) for layer in self.layers]

    def _make_hook(self, layer: LayerInfo):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.armed:
                return
            self.features[layer.name] = as_feature_map(out, layer).detach().float().cpu()
            if self.stop_early and len(self.features) == len(self.layers):
                raise _AllCollected
        return hook

    def run(self, forward) -> dict[str, torch.Tensor]:
        """Call ``forward()`` armed; return ``{layer: [B, C, h, w]}`` (float32, CPU), checked."""
        self.features, self.armed = {}, True
        try:
            forward()
        except _AllCollected:
            pass
        finally:
            self.armed = False
        missing = [l.name for l in self.layers if l.name not in self.features]
        if missing:
            raise HookNeverFired(f"layers {missing} produced nothing during the feature pass: their modules were "
                                 f"bypassed (e.g. a fused attention processor); drop them from features.layers")
        return self.features


class FeatureExtractor:
    """Features of batches of RGB images from one pipeline (see the module docstring).

    :param pipe: a diffusers pipeline of any family (real, toy or random weights).
    :param spec: the :class:`FeatureSpec`.
    :param device: where the VAE and the U-Net run (default: the U-Net's device).
    """

    def __init__(self, pipe: Any, spec: FeatureSpec, device: torch.device | str | None = None) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.spec = pipe, spec
        self.family = family_of(pipe)
        self.denoiser = getattr(pipe, self.family.denoiser)
        self.device = torch.device(device) if device is not None else self.denoiser.device
        self.size = spec.image_size or native_image_size(pipe)
        factor = int(pipe.vae_scale_factor)
        stride = 8 if self.family.is_unet else token_stride(self.family, self.denoiser)
        if self.size % (factor * stride):
            what = "the U-Net's 3 down-samplings" if self.family.is_unet else f"the {stride}x{stride} token patches"
            raise ValueError(f"features.image_size={self.size} must be a multiple of {factor * stride} (VAE factor "
                             f"{factor} x {what}); the native size is {native_image_size(pipe)}")
        self.latent_hw = latent_hw(self.family, factor, self.size, self.size)
        self.registry = lens_registry(pipe, self.latent_hw)
        self.layers = self.registry.select(["*" if p == "all" else p for p in spec.layers])
        sched = getattr(pipe, "native_scheduler", None) or pipe.scheduler
        self.flow = self.family.flow_matching
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        if not self.flow:
            self.noise_scheduler = DDPMScheduler.from_config(sched.config)
        t_max = self.num_train_timesteps - 1
        top = max(spec.timestep, spec.denoise_from if spec.denoise_steps else 0)
        if top > t_max:
            raise ValueError(f"timestep {top} is beyond the scheduler's last training timestep {t_max}")
        self.prediction_type = "flow" if self.flow else self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}: epsilon or v_prediction")
        self._cond: dict[str, torch.Tensor] | None = None

    # -- pieces ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def condition(self) -> dict[str, torch.Tensor]:
        """The prompt's conditioning (batch 1) as the family's denoiser takes it, computed once."""
        if self._cond is None:
            self._cond = encode_condition(self.pipe, self.family, self.spec.prompt, self.device)
        return self._cond

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Scaled VAE latents (posterior means) of uint8 RGB images, resized to the model's size."""
        batch = np.stack([resize_image(np.asarray(im, dtype=np.uint8), self.size) for im in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        vae = self.pipe.vae
        x = x.to(self.device, vae.dtype)
        latents = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    def _alpha(self, t: int) -> float:
        return float(self.noise_scheduler.alphas_cumprod[t])

    def _sigma(self, t: int) -> float:
        return flow_sigma(t, self.num_train_timesteps)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """``latents`` forward-noised to ``t``: DDPM's ``add_noise``, or flow matching's interpolation."""
        if self.flow:
            s = self._sigma(t)
            return (1 - s) * latents + s * noise
        t0 = torch.full((latents.shape[0],), t, dtype=torch.long)
        return self.noise_scheduler.add_noise(latents, noise, t0.to(latents.device))

    def _eps_and_x0(self, model_out: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flow:           # v = noise - x0, x_t = (1 - s) x0 + s noise
            s = self._sigma(t)
            x0 = x - s * model_out
            return x + (1 - s) * model_out, x0
        a = self._alpha(t)
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        else:   # v-prediction: v = sqrt(a) eps - sqrt(1-a) x0
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * model_out
            eps = a ** 0.5 * model_out + (1 - a) ** 0.5 * x
        return eps, x0

    def _step_to(self, eps: torch.Tensor, x0: torch.Tensor, t_next: int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0), or its flow-matching counterpart, to ``t_next``."""
        if self.flow:
            s = self._sigma(t_next)
            return (1 - s) * x0 + s * eps
        a_next = self._alpha(t_next)
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps

    def _unet(self, x: torch.Tensor, t: int, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return denoiser_pass(self.pipe, self.family, x, t, cond)

    # -- the extraction ------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{layer: [N, C, h, w]}`` (float32, CPU) for N images; ``keys`` seed each image's noise."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} noise keys")
        out: dict[str, list[torch.Tensor]] = {l.name: [] for l in self.layers}
        bs = self.spec.batch_size
        for i in range(0, len(images), bs):
            feats = self._extract_batch(images[i:i + bs], keys[i:i + bs])
            for name, f in feats.items():
                out[name].append(f)
        return {name: torch.cat(parts) for name, parts in out.items()}

    def _extract_batch(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        spec = self.spec
        latents = self.encode(images)
        noise = noise_for(keys, spec.noise_seed, tuple(latents.shape[1:])).to(self.device, latents.dtype)
        schedule = denoise_schedule(spec.denoise_from, spec.timestep, spec.denoise_steps)
        x = self.noised(latents, noise, schedule[0])
        cond = self.condition()
        for t, t_next in zip(schedule[:-1], schedule[1:]):     # deterministic DDIM (eta = 0)
            eps, x0 = self._eps_and_x0(self._unet(x, t, cond), x, t)
            x = self._step_to(eps, x0, t_next)
        with FeatureCapture(self.denoiser, self.layers) as capture:
            return capture.run(lambda: self._unet(x, schedule[-1], cond))
