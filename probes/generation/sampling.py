"""Generation with capture: prompts -> images + per-step activations, one guided pass per image.

Uses the stock diffusers pipeline of the model's family (K-LMS swapped in from the model's own
scheduler config, or the model's own scheduler: ``scheduler: native``) and the reference's latent
initialisation, so images match the reference's for the same weights. The family-specific
arguments of the call are :mod:`probes.generation.call`'s. Batches are fixed chunks of the full
index list: whichever samples are missing and however many ranks share the work, a sample is
always generated in the same batch, hence bit-identically.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import InitVar, asdict, dataclass, field

import numpy as np
import torch

from probes.common.progress import progress_bar
from probes.diffusion.families.spec import Family, family_of
from probes.diffusion.families.spec import native_size as family_native_size
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import precision_of
from probes.generation.call import call_kwargs, family_latents, step_callback_kwargs
from probes.generation.capture import ActivationCapture
from probes.prompts.sets import PromptRecord

#: ``generation.scheduler`` -> diffusers class; ``native`` keeps the model's own (its class and config)
SCHEDULERS = {"lms": "LMSDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler", "native": None}
#: which latent is decoded into an image at every captured step (``generation.decode``)
DECODE = ("none", "noisy", "x0")
#: where a sample's latents come from (``generation.start``): ``noise`` (sampled: the protocol) or
#: ``renders`` (the toy world's exact-label protocol: a render's latent noised to every step, :mod:`probes.generation.renders`)
STARTS = ("noise", "renders")
#: samplers whose ``step`` reports the predicted clean latent (``pred_original_sample``); ``native``
#: when the model's own reports it, or is a flow-matching one (x0 = x_t - sigma v, computed here)
X0_SCHEDULERS = ("lms", "ddim", "euler", "native")


@dataclass
class GenerationSpec:
    """How images are generated (the protocol's defaults).

    :param steps: denoising steps (15).
    :param guidance_scale: classifier-free guidance (7.5), empty prompt as unconditional.
    :param height: image height; ``None`` takes the model's native size (512 for SD v1.4).
    :param width: image width; ``None`` likewise.
    :param scheduler: ``lms`` (K-LMS, the protocol), ``ddim``, ``pndm``, ``euler``, ``dpm``, built
        from the model's own scheduler config; or ``native``: the model's own scheduler (class and
        config), the only choice for the flow-matching families (SD3, FLUX). "step" is the index of
        the denoising step and "timestep" what the scheduler reports for it (K-LMS: 999 … 0; flow
        matching: 1000 x sigma); the store keeps both, and the scheduler's sigmas.
    :param negative_prompt: the unconditional prompt (FLUX: only with ``true_cfg_scale > 1``).
    :param batch_size: images per pipeline call.
    :param decode: which latent of every captured step is decoded into an image, so that the
        labelers (and a classifier) can be run on the intermediate images: the protocol's
        "off-the-shelf model on decoded images" baseline. ``noisy``: the noisy latent x_{t-1}
        the sampler hands to the next step (the scheduler's ``prev_sample``, what the 2024
        replication decoded; noise-filled early on, the final image at the last step); ``x0``:
        the sampler's predicted clean latent (clean-looking from the first steps, so labelers
        "succeed" earlier than in the replication); ``none``: nothing decoded. Costs one VAE
        decode per test image and step.
    :param true_cfg_scale: FLUX's true classifier-free guidance (two denoiser calls per step, the
        conditional one first, with ``negative_prompt``); 1 (off) for FLUX.1-schnell/-dev, whose
        distilled guidance needs one pass. Other families guide with ``guidance_scale``.
    :param max_sequence_length: T5 token length of the prompts (SD3, PixArt, FLUX; ``None``: the
        pipeline's default).
    :param start: ``noise`` (the protocol: sampled from each seed's noise) or ``renders`` (the toy
        world's exact-label protocol, :mod:`probes.generation.renders`: each record's scene is rendered,
        encoded, noised to every step's timestep with the seed's noise and run through the denoiser
        once per captured step, conditional pass only; nothing is sampled, so ``guidance_scale``
        steers nothing and the store's image is the render; ``decode: noisy`` decodes the render's
        latent noised to the *next* step's level, the sampler's x_{t-1} on the render's own path, and at
        the last step the clean latent: the VAE's reconstruction of the render).
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
    true_cfg_scale: float = 1.0
    max_sequence_length: int | None = None
    start: str = "noise"
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
        if self.true_cfg_scale < 1:
            raise ValueError(f"generation.true_cfg_scale must be >= 1 (1: off), got {self.true_cfg_scale}")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"generation.max_sequence_length must be >= 1 or null, got {self.max_sequence_length}")
        if self.start not in STARTS:
            raise ValueError(f"generation.start must be one of {' | '.join(STARTS)}, got {self.start!r}")
        if self.start == "renders" and self.decode == "x0":
            raise ValueError("generation.start=renders samples no trajectory, so no sampler predicts an x0 to decode "
                             "(generation.decode='x0'): set generation.decode=noisy (the render's latent at the next "
                             "step's noise level, what the sampler would hand on) or none")

    def check_family(self, family: Family) -> None:
        """Refuse, at config time, settings the model family cannot run."""
        if family.flow_matching and self.scheduler != "native":
            raise ValueError(f"generation.scheduler={self.scheduler!r}: model family {family.name} is a flow-matching "
                             f"model, which only its own flow-matching scheduler samples; set generation.scheduler=native")
        if family.guidance != "distilled" and self.true_cfg_scale != 1.0:
            raise ValueError(f"generation.true_cfg_scale is FLUX's true CFG; model family {family.name} guides with "
                             f"generation.guidance_scale: leave true_cfg_scale at 1")
        if self.start == "renders" and (not family.is_unet or family.flow_matching):
            raise ValueError(f"generation.start=renders noises a latent with the scheduler's add_noise, which the "
                             f"U-Net families' samplers have; model family {family.name} has another: use "
                             f"generation.start=noise")
        if family.is_unet and self.max_sequence_length is not None:
            raise ValueError(f"generation.max_sequence_length applies to T5 text encoders; model family {family.name} "
                             f"has none: leave it unset")

    def cfg_layout(self, family: Family) -> str:
        """How this generation lays out classifier-free guidance for ``family``'s denoiser (``renders``:
        the conditional pass alone, ``none``)."""
        if self.start == "renders":
            return "none"
        return family.cfg_layout(self.guidance_scale, self.true_cfg_scale)

    def fingerprint_fields(self) -> dict:
        """``asdict`` without the options at the values every store had before they existed (so that
        those stores keep their fingerprints); ``decode`` is written by the store request itself."""
        d = asdict(self)
        if d["true_cfg_scale"] == 1.0:
            d.pop("true_cfg_scale")
        if d["max_sequence_length"] is None:
            d.pop("max_sequence_length")
        if d["start"] == "noise":
            d.pop("start")
        return d


@dataclass
class CaptureSpec:
    """What is captured.

    :param layers: layer names or patterns (``["*"]``: every default layer of the model family, for
        SD v1.4 its 16 self-attentions; ``["up*"]``, ``["joint*"]``). They are checked against the
        family where it is known (:class:`probes.training.datamodule.ActivationDataModule`,
        :func:`probes.diffusion.families.layers.check_patterns`), and resolved on the loaded model.
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


def native_size(pipe) -> tuple[int, int]:
    """The model's native image size (:func:`probes.diffusion.families.spec.native_size`)."""
    return family_native_size(pipe)


def image_size(pipe, spec: GenerationSpec) -> tuple[int, int]:
    """(H, W) the spec generates at (the model's native size unless set)."""
    native = native_size(pipe)
    return spec.height or native[0], spec.width or native[1]


def start_latents(pipe, seeds: Sequence[int], spec: GenerationSpec) -> torch.Tensor:
    """The reference's initial latents for ``seeds`` (:func:`probes.generation.call.initial_latents`; packed for FLUX), on
    the pipeline's device in the latent dtype of its precision (``diffusion.precision``)."""
    height, width = image_size(pipe, spec)
    latents = family_latents(pipe, family_of(pipe), seeds, height, width)
    return latents.to(pipe.device, precision_of(pipe).latents)


def pipeline_kwargs(pipe, prompts: Sequence[str], seeds: Sequence[int], spec: GenerationSpec,
                    on_step_end) -> dict:
    """Every argument of one pipeline call of ``spec`` for ``prompts`` and ``seeds``, with
    ``on_step_end`` (``callback_on_step_end``-shaped) called at every step."""
    family = family_of(pipe)
    height, width = image_size(pipe, spec)
    kw = call_kwargs(family, prompts, spec.steps, height, width, spec.guidance_scale, spec.negative_prompt,
                     start_latents(pipe, seeds, spec), spec.true_cfg_scale, spec.max_sequence_length)
    kw.update(step_callback_kwargs(family, pipe, on_step_end))
    return kw


@contextlib.contextmanager
def denoising(pipe, autograd_in_hooks: bool = False) -> Iterator[None]:
    """The one precision path of every pipeline call (the store's generation and the intervention's):
    no autograd, and the autocast of the pipeline's precision (fp16 on CUDA for ``reference``, none
    on the CPU). ``autograd_in_hooks`` uses ``no_grad`` instead of ``inference_mode``, so that hook
    objects may run autograd inside (the intervention's editor); the numbers are the same."""
    grad_mode = torch.no_grad() if autograd_in_hooks else torch.inference_mode()
    with grad_mode, precision_of(pipe).autocast_context(pipe.device.type):
        yield


def native_scheduler(pipe):
    """The scheduler the model came with (kept by the loader as ``pipe.native_scheduler``: the
    pipeline's own attribute is swapped for every run's sampler)."""
    return getattr(pipe, "native_scheduler", None) or pipe.scheduler


def portable_config(source, target: type) -> dict:
    """``source``'s config as ``target.from_config`` should read it: without the entries that only
    spell out ``source``'s class defaults.

    A scheduler built in memory remembers which settings were defaults (diffusers'
    ``_use_default_values``) and ``from_config`` of another class leaves those to the new class's
    own defaults; a folder written by ``save_pretrained`` spells every default out, so K-LMS built
    from a saved SD v1.x folder read PNDM's default ``timestep_spacing: leading`` (timesteps 925,
    859, …) where the Hub's sparse config gives K-LMS its own ``linspace`` (999, 927.6, …, 0: the
    protocol's). Dropping the values equal to the source class's defaults makes both read the same.
    """

    config = dict(source.config)
    if type(source) is target:
        return config
    params = inspect.signature(type(source).__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {k: v for k, v in config.items()
            if not (k in defaults and _same(defaults[k], v))}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) == list(b or []) if a is not None and b is not None else a is b
    return a == b


def make_scheduler(pipe, name: str, record_x0: bool = False):
    """The chosen sampler, built from the model's own scheduler config (betas etc. carry over;
    :func:`portable_config`); ``native``: a fresh copy of the model's own.

    With ``record_x0`` it is a subclass that keeps each step's ``pred_original_sample``, which
    the pipeline otherwise discards (behaviour swapped by an object, not a patched loop); a
    flow-matching scheduler, which reports none, gets ``x_t - sigma v``.
    """
    import diffusers

    source = native_scheduler(pipe)
    cls = type(source) if SCHEDULERS[name] is None else getattr(diffusers, SCHEDULERS[name])
    config = portable_config(source, cls)
    if not record_x0:
        return cls.from_config(config)
    sched = _x0_recording(cls).from_config(config)
    sched.x0_history = []
    return sched


def _x0_recording(base: type) -> type:

    names = list(inspect.signature(base.step).parameters)[1:]     # model_output, timestep, sample, ...
    flow = "FlowMatch" in base.__name__

    class X0Recording(base):
        def step(self, *args, **kwargs):
            return_dict = kwargs.pop("return_dict", True)
            out = super().step(*args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None and flow:            # x_t = (1 - sigma) x0 + sigma noise, v = noise - x0
                given = dict(zip(names, args), **kwargs)
                sigma = self.sigmas[self.step_index - 1]
                x0 = (given["sample"].float() - sigma * given["model_output"].float()).to(given["sample"].dtype)
            if x0 is None:
                raise ValueError(f"generation.decode=x0 needs a sampler that reports its predicted x0; "
                                 f"{base.__name__} does not (use lms, ddim, euler or a flow-matching model's native "
                                 f"scheduler, or decode=noisy)")
            self.x0_history.append(x0)
            return out if return_dict else (out.prev_sample,)

    X0Recording.step.__signature__ = inspect.signature(base.step)  # the pipeline inspects it for eta/generator
    X0Recording.__name__ = base.__name__
    return X0Recording


def decode_latents(pipe, latents: torch.Tensor, height: int | None = None, width: int | None = None,
                   chunk: int = 8) -> np.ndarray:
    """Latents -> uint8 images ``[N, H, W, 3]``, as the pipeline decodes its output: FLUX's packed
    tokens ``[N, tokens, 64]`` are unpacked first (``height``/``width``: the image size), and the
    VAE's ``shift_factor`` (SD3, FLUX) is added back after unscaling."""
    family = family_of(pipe)
    shift = getattr(pipe.vae.config, "shift_factor", None)
    out = []
    for k in range(0, len(latents), chunk):
        x = latents[k:k + chunk]
        if family.packed_latents:
            if height is None or width is None:
                raise ValueError("decoding FLUX's packed latents needs the image height and width")
            x = type(pipe)._unpack_latents(x, height, width, pipe.vae_scale_factor)
        x = x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        if shift is not None:
            x = x + shift
        img = pipe.vae.decode(x, return_dict=False)[0]
        img = pipe.image_processor.postprocess(img, output_type="np")
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    idx = list(indices)
    return [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]


@dataclass
class GeneratedBatch:
    indices: list[int]
    images: np.ndarray                 # [B, H, W, 3] uint8
    acts: dict[str, torch.Tensor]      # layer -> [B, S_sel, halves, T, C] (device per `acts_device`)
    timesteps: list[float]             # all S timesteps of the sampler
    sigmas: list[float | None]         # all S sigmas of the sampler (None where it has none)
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
    family = family_of(pipe)
    spec.check_family(family)
    pipe.scheduler = make_scheduler(pipe, spec.scheduler, record_x0=spec.decode == "x0")
    height, width = image_size(pipe, spec)
    bar = StepProgress(len(chunks), spec.steps, len(todo_set), desc, progress)
    cap = ActivationCapture(getattr(pipe, family.denoiser), layers, spec.steps, capture.steps, capture.halves,
                            getattr(torch, capture.dtype), cfg=spec.cfg_layout(family),
                            record_inputs=capture.record_inputs)
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

            if spec.decode == "x0":
                pipe.scheduler.x0_history = []
            kw = pipeline_kwargs(pipe, [r.prompt for r in recs], [r.seed for r in recs], spec, on_step_end)
            with denoising(pipe):
                out = pipe(**kw)
                decoded = None
                if spec.decode != "none":
                    decoded = np.zeros((0, len(cap.steps), height, width, 3), np.uint8)
                    if rows:
                        per_step = ([noisy[s] for s in cap.steps] if spec.decode == "noisy"
                                    else [pipe.scheduler.x0_history[s][rows] for s in cap.steps])
                        lat = torch.stack(per_step, 1)                      # [R, S_sel, C, h, w] (FLUX: [R, S_sel, N, C])
                        decoded = decode_latents(pipe, lat.flatten(0, 1), height, width).reshape(
                            len(rows), len(cap.steps), height, width, 3)
            acts = cap.collect(acts_device)
            inputs = cap.collect_inputs("cpu") if capture.record_inputs else None
            images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
            sel = torch.tensor(keep)
            unet_calls = cap.unet_calls - calls0
            batch = GeneratedBatch(indices=[chunk[k] for k in keep], images=images[keep],
                                   acts={n: a[sel.to(a.device)] if len(keep) < len(chunk) else a for n, a in acts.items()},
                                   timesteps=[float(t) for t in cap.timesteps], sigmas=list(cap.sigmas),
                                   decoded_images=decoded,
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
    return sampler_schedule(pipe, spec)[0]


class _FirstCall(Exception):
    """Stops a pipeline call at its first denoiser call (the schedule is set by then)."""


def sampler_schedule(pipe, spec: GenerationSpec) -> tuple[list[float], list[float | None]]:
    """The timesteps and sigmas the sampler will visit, one per step, before generating.

    The protocol's samplers set them from the step count alone. A model's own scheduler is set by
    its pipeline, which may pass its own sigmas (FLUX: ``linspace(1, 1/steps, steps)``) or a shift
    computed from the image size, so for ``native`` the pipeline itself is called on one prompt and
    stopped at its first denoiser call, when the scheduler holds what this run will visit.
    """
    if spec.scheduler != "native":
        sched = make_scheduler(pipe, spec.scheduler)
        sched.set_timesteps(spec.steps)
        sigmas = getattr(sched, "sigmas", None)
        return ([float(t) for t in sched.timesteps],
                [float(sigmas[i]) if sigmas is not None and i < len(sigmas) else None for i in range(spec.steps)])
    family = family_of(pipe)
    saved = pipe.scheduler
    pipe.scheduler = make_scheduler(pipe, "native")

    def stop(module, args):
        raise _FirstCall

    handle = getattr(pipe, family.denoiser).register_forward_pre_hook(stop)
    try:
        kw = pipeline_kwargs(pipe, [""], [0], spec, lambda p, i, t, k: k)
        with denoising(pipe):
            pipe(**kw)
    except _FirstCall:
        pass
    finally:
        handle.remove()
        sched, pipe.scheduler = pipe.scheduler, saved
    sigmas = getattr(sched, "sigmas", None)
    return ([float(t) for t in sched.timesteps],
            [float(sigmas[i]) if sigmas is not None and i < len(sigmas) else None for i in range(spec.steps)])


