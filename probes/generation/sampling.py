"""Generation with capture: prompts -> images + per-step activations, one guided pass per image.

Uses the stock diffusers pipeline (K-LMS swapped in from the model's own scheduler config) and
the reference's latent initialisation, so images match the reference's for the same weights.
Batches are fixed chunks of the full index list: whichever samples are missing and however many
ranks share the work, a sample is always generated in the same batch, hence bit-identically.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from probes.common.progress import progress_bar
from probes.diffusion.layers import LayerInfo, check_layer_patterns
from probes.diffusion.loading import precision_of
from probes.generation.capture import ActivationCapture
from probes.prompts.sets import PromptRecord

SCHEDULERS = {"lms": "LMSDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler"}
#: which latent is decoded into an image at every captured step (``generation.decode``)
DECODE = ("none", "noisy", "x0")
#: samplers whose ``step`` reports the predicted clean latent (``pred_original_sample``)
X0_SCHEDULERS = ("lms", "ddim", "euler")


@dataclass
class GenerationSpec:
    """How images are generated (the protocol's defaults).

    :param steps: denoising steps (15).
    :param guidance_scale: classifier-free guidance (7.5), empty prompt as unconditional.
    :param height: image height; ``None`` takes the model's native size (512 for SD v1.4).
    :param width: image width; ``None`` likewise.
    :param scheduler: ``lms`` (K-LMS, the protocol), ``ddim``, ``pndm``, ``euler`` or ``dpm``.
    :param negative_prompt: the unconditional prompt.
    :param batch_size: images per pipeline call.
    :param decode: which latent of every captured step is decoded into an image, so that the
        labelers (and a classifier) can be run on the intermediate images: the protocol's
        "off-the-shelf model on decoded images" baseline. ``noisy``: the noisy latent x_{t-1}
        the sampler hands to the next step (the scheduler's ``prev_sample``, what the 2024
        replication decoded; noise-filled early on, the final image at the last step); ``x0``:
        the sampler's predicted clean latent (clean-looking from the first steps, so labelers
        "succeed" earlier than in the replication); ``none``: nothing decoded. Costs one VAE
        decode per test image and step.
    :param decode_x0: deprecated (before ``decode`` existed): ``true`` means ``decode: x0``.
    """

    steps: int = 15
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str = "lms"
    negative_prompt: str = ""
    batch_size: int = 4
    decode: str = "none"
    # an init-only alias: configs and probe exports written before ``decode`` keep loading, and it
    # never enters ``asdict`` (the store fingerprint, exported configs)
    decode_x0: InitVar[bool | None] = None

    def __post_init__(self, decode_x0: bool | None = None) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"generation.scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"generation.steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if decode_x0:
            if self.decode not in ("none", "x0"):
                raise ValueError(f"generation.decode_x0 (deprecated) and generation.decode={self.decode!r} disagree: "
                                 f"drop decode_x0 and keep generation.decode (none | noisy | x0)")
            warnings.warn("generation.decode_x0 is deprecated: it means generation.decode: x0 (the predicted clean "
                          "latent); the protocol decodes the noisy latent, generation.decode: noisy", FutureWarning,
                          stacklevel=3)
            self.decode = "x0"
        if self.decode not in DECODE:
            raise ValueError(f"generation.decode must be one of {' | '.join(DECODE)}, got {self.decode!r} (noisy: the "
                             f"latent x_(t-1) after each step, as the replication; x0: the predicted clean latent)")
        if self.decode == "x0" and self.scheduler not in X0_SCHEDULERS:
            raise ValueError(f"generation.decode=x0 needs a sampler that reports its predicted x0 "
                             f"({', '.join(X0_SCHEDULERS)}); generation.scheduler={self.scheduler!r} does not. Use "
                             f"generation.decode=noisy, or another scheduler")


@dataclass
class CaptureSpec:
    """What is captured.

    :param layers: layer names or patterns (``["*"]``: all 16 self-attentions; ``["up*"]``).
    :param steps: step indices 0..S-1 to keep; ``None`` keeps every step.
    :param halves: ``cond`` (the protocol) or ``both`` (unconditional and conditional).
    :param dtype: storage dtype (``float16``).
    :param record_inputs: also store the denoiser's inputs at every captured step (the latent
        model input ``x_t`` as the U-Net received it, the timestep, and the text embeddings): the
        trajectory another U-Net can be run on exactly (``probes.replay``: the same-image controls).
        Small next to the activations (``C x h x w`` numbers per step and image, plus one
        ``halves x 77 x D`` embedding per image).
    """

    layers: list[str] = field(default_factory=lambda: ["*"])
    steps: list[int] | None = None
    halves: str = "cond"
    dtype: str = "float16"
    record_inputs: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in {"float16", "float32"}:
            raise ValueError(f"capture.dtype must be float16 or float32 (stored as .npy), got {self.dtype!r}")
        if self.halves not in {"cond", "both"}:
            raise ValueError(f"capture.halves must be 'cond' or 'both', got {self.halves!r}")
        check_layer_patterns(self.layers)


def native_size(pipe) -> tuple[int, int]:
    s = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return s, s


def image_size(pipe, spec: GenerationSpec) -> tuple[int, int]:
    """(H, W) the spec generates at (the model's native size unless set)."""
    native = native_size(pipe)
    return spec.height or native[0], spec.width or native[1]


def start_latents(pipe, seeds: Sequence[int], spec: GenerationSpec) -> torch.Tensor:
    """The reference's initial latents for ``seeds`` (:func:`initial_latents`), on the pipeline's device
    in the latent dtype of its precision (``diffusion.precision``)."""
    height, width = image_size(pipe, spec)
    f = pipe.vae_scale_factor
    latents = initial_latents(seeds, (pipe.unet.config.in_channels, height // f, width // f))
    return latents.to(pipe.device, precision_of(pipe).latents)


@contextlib.contextmanager
def denoising(pipe, autograd_in_hooks: bool = False) -> Iterator[None]:
    """The one precision path of every pipeline call (the store's generation and the intervention's):
    no autograd, and the autocast of the pipeline's precision (fp16 on CUDA for ``reference``, none
    on the CPU). ``autograd_in_hooks`` uses ``no_grad`` instead of ``inference_mode``, so that hook
    objects may run autograd inside (the intervention's editor); the numbers are the same."""
    grad_mode = torch.no_grad() if autograd_in_hooks else torch.inference_mode()
    with grad_mode, precision_of(pipe).autocast_context(pipe.device.type):
        yield


def make_scheduler(pipe, name: str, record_x0: bool = False):
    """The chosen sampler, built from the model's own scheduler config (betas etc. carry over).

    With ``record_x0`` it is a subclass that keeps each step's ``pred_original_sample``, which
    the pipeline otherwise discards (behaviour swapped by an object, not a patched loop).
    """
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    if not record_x0:
        return cls.from_config(pipe.scheduler.config)
    sched = _x0_recording(cls).from_config(pipe.scheduler.config)
    sched.x0_history = []
    return sched


def _x0_recording(base: type) -> type:
    class X0Recording(base):
        def step(self, *args, **kwargs):
            return_dict = kwargs.pop("return_dict", True)
            out = super().step(*args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                raise ValueError(f"generation.decode=x0 needs a sampler that reports its predicted x0; "
                                 f"{base.__name__} does not (use {', '.join(X0_SCHEDULERS)}, or decode=noisy)")
            self.x0_history.append(x0)
            return out if return_dict else (out.prev_sample,)

    X0Recording.step.__signature__ = inspect.signature(base.step)  # the pipeline inspects it for eta/generator
    X0Recording.__name__ = base.__name__
    return X0Recording


def decode_latents(pipe, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """Latents ``[N, C, h, w]`` -> uint8 images ``[N, H, W, 3]``, as the pipeline decodes its output."""
    out = []
    for k in range(0, len(latents), chunk):
        x = latents[k:k + chunk].to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        img = pipe.vae.decode(x, return_dict=False)[0]
        img = pipe.image_processor.postprocess(img, output_type="np")
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The reference's init: ``torch.manual_seed(seed); torch.randn(1, *shape)`` on the CPU, per image.

    Unscaled: the pipeline multiplies by the scheduler's ``init_noise_sigma`` itself.
    """
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    idx = list(indices)
    return [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]


@dataclass
class GeneratedBatch:
    indices: list[int]
    images: np.ndarray                 # [B, H, W, 3] uint8
    acts: dict[str, torch.Tensor]      # layer -> [B, S_sel, halves, T, C] (device per `acts_device`)
    timesteps: list[float]             # all S timesteps of the sampler
    #: [len(decoded_indices), S_sel, H, W, 3] uint8: the latent ``spec.decode`` names, decoded at every
    #: captured step (None when ``decode`` is ``none``)
    decoded_images: np.ndarray | None
    unet_calls: int                    # batched U-Net calls for this chunk (one per step with K-LMS)
    guided_calls: int                  # per-image guided calls: unet_calls x images in the chunk
    #: the samples of ``indices`` whose intermediate images were decoded (rows of ``decoded_images``, in order)
    decoded_indices: list[int] = field(default_factory=list)
    #: with ``capture.record_inputs``: the U-Net's inputs per captured step (:meth:`ActivationCapture.collect_inputs`),
    #: rows of ``indices``; None otherwise
    inputs: dict[str, torch.Tensor] | None = None


class StepProgress:
    """One progress bar over denoising steps x batches, with the guided U-Net calls made so far.

    A batch of the SD v1.4 architecture takes minutes on a CPU: a bar that moves per batch sits at
    ``0/3`` for that long, so this one moves at every denoising step. Its counter is the same
    quantity as the end-of-generation summary: *guided* U-Net calls, one per image and step (a
    classifier-free-guidance call evaluates the conditional and the unconditional half together),
    i.e. the batched U-Net calls times the images in the batch.
    """

    def __init__(self, batches: int, steps: int, images: int, desc: str, enabled: bool) -> None:
        self.bar = progress_bar(batches * steps, desc, "step", enabled)
        self.images_total, self.images_done, self.guided_calls = images, 0, 0
        self.bar.set_postfix_str(f"images 0/{images}, guided U-Net calls 0", refresh=False)

    def step(self, guided_calls: int) -> None:
        """One denoising step done; ``guided_calls``: the run's guided calls up to now."""
        self.guided_calls = guided_calls
        self.bar.update(1)
        self.bar.set_postfix_str(f"images {self.images_done}/{self.images_total}, "
                                 f"guided U-Net calls {guided_calls}", refresh=False)

    def batch_done(self, images: int) -> None:
        self.images_done += images
        self.bar.set_postfix_str(f"images {self.images_done}/{self.images_total}, "
                                 f"guided U-Net calls {self.guided_calls}")

    def close(self) -> None:
        self.bar.close()


def generate(pipe, records: Sequence[PromptRecord], todo: Sequence[int], spec: GenerationSpec,
             layers: Sequence[LayerInfo], capture: CaptureSpec, acts_device: str | None = "cpu",
             progress: bool = True, desc: str = "generating",
             universe: Sequence[int] | None = None, decode: Collection[int] | None = None) -> Iterator[GeneratedBatch]:
    """Yield generated batches for the chunks of ``universe`` that contain an index in ``todo``.

    Chunks are cut from ``universe`` (default: every record, in order; see the module docstring);
    each chunk that holds any wanted index is generated whole and yielded with only the wanted
    samples. ``acts_device=None`` leaves the activations on the model's device.

    ``decode`` (with ``spec.decode`` other than ``none``): the indices whose intermediate images
    are decoded; only the test split's are ever labelled, and a VAE decode per image and step costs
    about as much as the generation itself, so callers pass the test indices. ``None`` decodes every
    wanted sample. The noisy latent x_{t-1} is read where the pipeline hands it to
    ``callback_on_step_end`` (after the scheduler step); the predicted x0 from the scheduler's own
    output (see :func:`make_scheduler`).
    """
    todo_set = set(int(i) for i in todo)
    decode_set = todo_set if decode is None else {int(i) for i in decode}
    order = [r.index for r in records] if universe is None else list(universe)
    chunks = [c for c in batches(order, spec.batch_size) if todo_set.intersection(c)]
    by_index = {r.index: r for r in records}
    pipe.scheduler = make_scheduler(pipe, spec.scheduler, record_x0=spec.decode == "x0")
    height, width = image_size(pipe, spec)
    guidance = spec.guidance_scale > 1.0
    bar = StepProgress(len(chunks), spec.steps, len(todo_set), desc, progress)
    cap = ActivationCapture(pipe.unet, layers, spec.steps, capture.steps, capture.halves,
                            getattr(torch, capture.dtype), guidance, record_inputs=capture.record_inputs)
    cap_steps = set(cap.steps)
    guided_before = 0
    with cap:
        for chunk in chunks:
            recs = [by_index[i] for i in chunk]
            cap.reset()
            calls0 = cap.unet_calls
            keep = [k for k, i in enumerate(chunk) if i in todo_set]
            rows = [k for k in keep if chunk[k] in decode_set] if spec.decode != "none" else []  # decoded samples
            noisy: dict[int, torch.Tensor] = {}      # step -> x_{t-1} of the decoded rows (decode=noisy)
            record_noisy = spec.decode == "noisy" and bool(rows)

            def on_step_end(pipe_, i, t, kwargs, _n=len(chunk), _c0=calls0, _g0=guided_before, _rows=rows,
                            _noisy=noisy, _record=record_noisy):
                if _record and i in cap_steps:
                    _noisy[i] = kwargs["latents"][_rows].clone()   # x_{t-1}: the scheduler's prev_sample
                kwargs = cap.on_step_end(pipe_, i, t, kwargs)
                bar.step(_g0 + (cap.unet_calls - _c0) * _n)    # guided calls so far, as the summary counts them
                return kwargs

            latents = start_latents(pipe, [r.seed for r in recs], spec)
            if spec.decode == "x0":
                pipe.scheduler.x0_history = []
            with denoising(pipe):
                out = pipe(prompt=[r.prompt for r in recs], negative_prompt=[spec.negative_prompt] * len(recs),
                           num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                           height=height, width=width, latents=latents, output_type="np",
                           callback_on_step_end=on_step_end)
                decoded = None
                if spec.decode != "none":
                    decoded = np.zeros((0, len(cap.steps), height, width, 3), np.uint8)
                    if rows:
                        per_step = ([noisy[s] for s in cap.steps] if spec.decode == "noisy"
                                    else [pipe.scheduler.x0_history[s][rows] for s in cap.steps])
                        lat = torch.stack(per_step, 1)                                   # [R, S_sel, C, h, w]
                        decoded = decode_latents(pipe, lat.flatten(0, 1)).reshape(len(rows), len(cap.steps),
                                                                                   height, width, 3)
            acts = cap.collect(acts_device)
            inputs = cap.collect_inputs("cpu") if capture.record_inputs else None
            images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
            sel = torch.tensor(keep)
            unet_calls = cap.unet_calls - calls0
            batch = GeneratedBatch(indices=[chunk[k] for k in keep], images=images[keep],
                                   acts={n: a[sel.to(a.device)] if len(keep) < len(chunk) else a for n, a in acts.items()},
                                   timesteps=[float(t) for t in cap.timesteps], decoded_images=decoded,
                                   unet_calls=unet_calls, guided_calls=unet_calls * len(chunk),
                                   decoded_indices=[chunk[k] for k in rows],
                                   inputs=None if inputs is None else {
                                       k: v if k == "timesteps" else v[sel] for k, v in inputs.items()})
            guided_before += batch.guided_calls
            bar.batch_done(len(keep))
            yield batch
    bar.close()


def sampler_timesteps(pipe, spec: GenerationSpec) -> list[float]:
    """The timesteps the sampler will visit (known before generating: they go in the manifest)."""
    sched = make_scheduler(pipe, spec.scheduler)
    sched.set_timesteps(spec.steps)
    return [float(t) for t in sched.timesteps]


