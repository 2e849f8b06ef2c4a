"""Every family end to end on a tiny random pipeline saved as a folder and reloaded offline.

Per family, through the store's own generation path (:func:`probes.generation.sampling.generate`
on a pipeline from :func:`probes.diffusion.loading.load_pipeline`): (a) two images with capture on
three layers, steps, the scheduler's timesteps and sigmas recorded; (b) the captured readout equals
a direct forward of the same module on the same inputs, rule applied; for transformers, a block's
image tokens are what the model hands the next module; (c) the conditional half is the one the text
changes; (d) the image is bit-identical with and without capture; (e) the last step's decoded
latent is the pipeline's image (FLUX's unpacking, the VAE's shift). FLUX also runs with true CFG
(two calls per step), and the saved SD 1.x folder samples the protocol's K-LMS timesteps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_map

from probes.diffusion.families.layers import registry_for
from probes.diffusion.families.loading import FamilyMismatch, family_of_folder
from probes.diffusion.families.spec import get_family
from probes.diffusion.families.tiny import build_tiny_pipeline, save_tiny_pipeline
from probes.diffusion.loading import DiffusionSpec, load_pipeline
from probes.diffusion.readout import read_tokens
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate, make_scheduler, sampler_schedule
from probes.prompts.sets import PromptRecord

FAMILIES = ["sd1", "sd2", "sdxl", "sd3", "pixart_alpha", "pixart_sigma", "flux"]
#: three layers per family: first, a middle one, last (FLUX: a double- and two single-stream blocks)
LAYERS = {"sd1": ["down0.0", "mid.0", "up3.2"], "sd2": ["down0.0", "mid.0", "up3.2"],
          "sdxl": ["down1.0", "mid.0.1", "up1.2"], "sd3": ["joint0", "joint1", "joint2"],
          "pixart_alpha": ["block0", "block1", "block2"], "pixart_sigma": ["block0", "block1", "block2"],
          "flux": ["joint1", "single0", "single1"]}
PROMPTS, OTHER = ["a red cube on a table", "a blue ball"], ["a green tree in a field", "a blue ball"]
SEEDS, STEPS, SIZE = [11, 12], 3, 32
#: layers the text cannot reach at step 0: SD 1.x/2.x's first self-attention runs before any
#: cross-attention, on a latent and a time embedding that do not depend on the prompt (SDXL's time
#: embedding carries the pooled text, so its first self-attention does depend on it)
TEXT_FREE_AT_STEP0 = {("sd1", "down0.0"), ("sd2", "down0.0")}
#: family -> its saved pipeline folder (the module fixture's)
FOLDERS: dict = {}


def spec_for(family: str, **kw) -> GenerationSpec:
    """K-LMS (the protocol's) for the U-Nets, the model's own scheduler for the transformers; short T5
    sequences; both images in one batch."""
    unet = get_family(family).is_unet
    opts = dict(steps=STEPS, height=SIZE, width=SIZE, batch_size=2, scheduler="lms" if unet else "native",
                max_sequence_length=None if unet else 16,
                guidance_scale=1.0 if get_family(family).guidance == "distilled" else 5.0)
    return GenerationSpec(**{**opts, **kw})


def run(pipe, prompts, layers=(), halves="cond", **kw):
    """One batch of the store's generation; ``layers=()``: no capture hooks at all."""
    family = pipe.family
    records = [PromptRecord(index=i, prompt=p, seed=s, split="train") for i, (p, s) in enumerate(zip(prompts, SEEDS))]
    (batch,) = list(generate(pipe, records, range(len(records)), spec_for(family, **kw), list(layers),
                             CaptureSpec(layers=["*"], halves=halves, dtype="float32"), progress=False))
    return batch


def guided(family: str) -> bool:
    return get_family(family).guidance == "cfg"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    family = request.param
    folder = FOLDERS[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(family) / "pipeline")
    assert family_of_folder(folder).name == family
    pipe = load_pipeline(DiffusionSpec(model_id=str(folder), precision="fp32", tokenizer="default",
                                       local_files_only=True))
    assert pipe.family == family
    return family, pipe


def layers_of(family, pipe, names=None, kinds=None):
    return registry_for(pipe, SIZE, SIZE, kinds=kinds).select(names or LAYERS[family])


class InputRecorder:
    """Forward pre-hooks that keep a copy of a module's inputs at chosen calls."""

    def __init__(self, pipe, family, modules, calls):
        den = getattr(pipe, get_family(family).denoiser)
        self.inputs, self.handles, self.count = {}, [], {}
        for path in modules:
            self.count[path] = 0

            def pre(module, args, kwargs, _p=path):
                if self.count[_p] in calls:
                    copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
                    self.inputs[(_p, self.count[_p])] = (tree_map(copy, args), tree_map(copy, kwargs))
                self.count[_p] += 1

            self.handles.append(den.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
        self.den = den

    def rerun(self, path, call):
        args, kwargs = self.inputs[(path, call)]
        with torch.inference_mode():
            return self.den.get_submodule(path)(*args, **kwargs)

    def remove(self):
        for h in self.handles:
            h.remove()


#: what makes each family itself, checked on the reloaded folder
FAMILY_FACTS = {
    "sd2": {"scheduler.config.prediction_type": "v_prediction", "unet.config.use_linear_projection": True},
    "sdxl": {"text_encoder_2": "CLIPTextModelWithProjection", "unet.config.addition_embed_type": "text_time",
             "tokenizer_2.pad_token": "!"},
    "sd3": {"text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5Tokenizer",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "transformer.config.patch_size": 2},
    "pixart_alpha": {"text_encoder": "T5EncoderModel", "transformer.config.patch_size": 2},
    "pixart_sigma": {"text_encoder": "T5EncoderModel", "transformer.config.patch_size": 2},
    "flux": {"text_encoder_2": "T5EncoderModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
             "transformer.config.guidance_embeds": False},
}


def test_reloaded_folder_generates_what_the_built_pipeline_does(tiny):
    """Weights, configs and tokenizers survive save_pretrained/from_pretrained, and a sampler built
    from the saved folder's scheduler config is the one built from the in-memory one: the saved
    config spells out every default (PNDM's ``timestep_spacing: leading``), which
    :func:`probes.generation.sampling.portable_config` leaves to the new class, as diffusers does
    for the in-memory config."""
    family, pipe = tiny
    built = build_tiny_pipeline(family)
    built.family, built.native_scheduler = family, built.scheduler
    a, b = run(pipe, PROMPTS), run(built, PROMPTS)
    assert np.array_equal(a.images, b.images) and a.timesteps == b.timesteps
    assert type(pipe).__name__ == get_family(family).pipeline
    for path, value in FAMILY_FACTS.get(family, {}).items():
        obj = pipe
        for part in path.split("."):
            obj = getattr(obj, part)
        assert (type(obj).__name__ if path.count(".") == 0 else obj) == value, path


def test_saved_sd1_folder_samples_the_protocols_k_lms_timesteps(tiny):
    """K-LMS from a saved SD v1.x folder visits linspace(999, 0, 15), as from the Hub's sparse config;
    without :func:`portable_config` it read PNDM's spelled-out ``leading`` spacing (925, 859, ...)."""
    family, pipe = tiny
    if family != "sd1":
        pytest.skip("the protocol's sampler on SD v1.x")
    assert pipe.native_scheduler.config.timestep_spacing == "leading"    # spelled out by save_pretrained
    timesteps, sigmas = sampler_schedule(pipe, GenerationSpec(steps=15, scheduler="lms"))
    np.testing.assert_allclose(timesteps, np.linspace(999, 0, 15), rtol=1e-6, atol=1e-4)
    assert sigmas[0] == pytest.approx(14.6146, rel=1e-4) and make_scheduler(pipe, "lms").config.timestep_spacing == \
        "linspace"
    assert make_scheduler(pipe, "native").config.timestep_spacing == "leading"   # the model's own, as saved


def test_capture_shapes_steps_timesteps_and_sigmas(tiny):
    family, pipe = tiny
    layers = layers_of(family, pipe)
    batch = run(pipe, PROMPTS, layers, halves="both" if guided(family) else "cond")
    assert batch.images.shape == (2, SIZE, SIZE, 3)
    for info in layers:
        assert batch.acts[info.name].shape == (2, STEPS, 2 if guided(family) else 1, info.tokens, info.channels)
    assert batch.unet_calls == STEPS
    assert batch.timesteps == [float(t) for t in pipe.scheduler.timesteps]   # step i <-> the scheduler's i-th
    assert batch.timesteps == sampler_schedule(pipe, spec_for(family))[0]     # the manifest's, known beforehand
    if get_family(family).flow_matching:                                       # flow matching: t = 1000 sigma
        np.testing.assert_allclose(batch.sigmas, np.array(batch.timesteps) / 1000, rtol=1e-5)
        assert batch.sigmas[0] == 1.0
    elif family != "pixart_alpha" and family != "pixart_sigma":                # K-LMS: sigma of the step's input
        assert batch.sigmas[0] == pytest.approx(float(pipe.scheduler.sigmas[0]))


def test_capture_equals_a_direct_forward_of_the_module(tiny):
    family, pipe = tiny
    unet = get_family(family).is_unet
    layers = layers_of(family, pipe, kinds=None if unet else ("block", "attn"),
                       names=LAYERS[family] + ([] if unet else [LAYERS[family][-1] + ".attn"]))
    step = STEPS - 1
    rec = InputRecorder(pipe, family, [info.module for info in layers], calls={step})
    try:
        batch = run(pipe, PROMPTS, layers, halves="both" if guided(family) else "cond")
    finally:
        rec.remove()
    for info in layers:
        direct = read_tokens(info, rec.rerun(info.module, step))         # [halves x 2, tokens, channels]
        captured = batch.acts[info.name][:, step]                        # [2, halves, tokens, channels]
        expected = direct.reshape(captured.shape[1], 2, *direct.shape[1:]).transpose(0, 1)
        torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-6)


def test_block_image_tokens_are_what_the_next_module_reads(tiny):
    """Independent of the readout rules' tuple positions: block i's image tokens are the
    ``hidden_states`` the model hands block i+1 (the last block's: the output norm's input)."""
    family, pipe = tiny
    if get_family(family).is_unet:
        pytest.skip("U-Net self-attention outputs are single tensors")
    blocks = list(registry_for(pipe, SIZE, SIZE))
    rec = InputRecorder(pipe, family, [b.module for b in blocks] + ["norm_out"], calls={0})
    try:
        batch = run(pipe, PROMPTS, blocks, halves="both" if guided(family) else "cond")
    finally:
        rec.remove()
    for info, nxt in zip(blocks, [b.module for b in blocks[1:]] + ["norm_out"]):
        args, kwargs = rec.inputs[(nxt, 0)]
        handed = kwargs.get("hidden_states", args[0] if args else None)
        captured = batch.acts[info.name][:, 0]                         # [2, halves, tokens, channels]
        expected = handed.reshape(captured.shape[1], 2, *handed.shape[1:]).transpose(0, 1)
        assert torch.equal(captured.to(handed.dtype), expected), f"{info.name} -> {nxt}"


def test_conditional_half_is_the_one_the_text_changes(tiny):
    """Same seeds and negative prompt, another prompt for image 0: at step 0 its unconditional half
    is unchanged and its conditional half moves; image 1 (same prompt) is unchanged throughout."""
    family, pipe = tiny
    layers = layers_of(family, pipe)
    halves = "both" if guided(family) else "cond"
    a, b = run(pipe, PROMPTS, layers, halves), run(pipe, OTHER, layers, halves)
    for info in layers:
        xa, xb = a.acts[info.name], b.acts[info.name]
        cond = xa.shape[2] - 1
        if (family, info.name) in TEXT_FREE_AT_STEP0:
            assert torch.equal(xa[0, 0], xb[0, 0]), info.name
            continue
        assert (xa[0, 0, cond] - xb[0, 0, cond]).abs().max() > 1e-3 * xa[0, 0, cond].abs().max(), info.name
        if guided(family):
            assert torch.equal(xa[0, 0, 0], xb[0, 0, 0]), info.name
        torch.testing.assert_close(xa[1], xb[1], rtol=1e-5, atol=1e-6)
    if not guided(family):
        with pytest.raises(ValueError, match="needs classifier-free guidance"):
            run(pipe, PROMPTS, layers, halves="both")


def test_image_is_bit_identical_with_and_without_capture_and_the_last_decoded_step_is_it(tiny):
    family, pipe = tiny
    plain = run(pipe, PROMPTS)
    captured = run(pipe, PROMPTS, layers_of(family, pipe), decode="noisy")
    assert np.array_equal(plain.images, captured.images)
    # x_(t-1) after the last step is the final latent: decoded as the pipeline decodes it (FLUX unpacks,
    # SD3/FLUX add the VAE's shift), it is the image
    last = captured.decoded_images[:, -1].astype(int)
    assert captured.decoded_images.shape == (2, STEPS, SIZE, SIZE, 3)
    assert np.abs(last - captured.images.astype(int)).max() <= 1


def test_flow_matching_x0_is_x_t_minus_sigma_v_and_the_last_one_is_the_image(tiny):
    """``decode: x0`` on a flow-matching scheduler, which reports no x0: ``x_t - sigma v``. At the last
    step the next sigma is 0, so the sampler's update lands exactly there: its x0 is the image."""
    family, pipe = tiny
    if not get_family(family).flow_matching:
        pytest.skip("flow matching's x0")
    batch = run(pipe, PROMPTS, decode="x0")
    assert batch.decoded_images.shape == (2, STEPS, SIZE, SIZE, 3)
    assert np.abs(batch.decoded_images[:, -1].astype(int) - batch.images.astype(int)).max() <= 1
    assert not np.array_equal(batch.decoded_images[:, 0], batch.images)     # step 0's x0 is a guess, not the image


def test_flux_true_cfg_runs_two_calls_per_step_cond_first(tiny):
    """FLUX's true CFG: the capture reassembles [uncond, cond] from two calls per step; the text
    moves only the conditional half, and the halves equal direct forwards of their own calls."""
    family, pipe = tiny
    if family != "flux":
        pytest.skip("true CFG is FLUX's")
    layers = layers_of(family, pipe, ["joint0", "single1"])
    rec = InputRecorder(pipe, family, [info.module for info in layers], calls={0, 1})
    try:
        a = run(pipe, PROMPTS, layers, halves="both", true_cfg_scale=2.0)
    finally:
        rec.remove()
    b = run(pipe, OTHER, layers, halves="both", true_cfg_scale=2.0)
    assert a.unet_calls == 2 * STEPS
    for info in layers:
        cond_call = read_tokens(info, rec.rerun(info.module, 0))
        uncond_call = read_tokens(info, rec.rerun(info.module, 1))
        torch.testing.assert_close(a.acts[info.name][:, 0, 1], cond_call, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.acts[info.name][:, 0, 0], uncond_call, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.acts[info.name][0, 0, 0], b.acts[info.name][0, 0, 0])
        assert not torch.equal(a.acts[info.name][0, 0, 1], b.acts[info.name][0, 0, 1])
    assert np.array_equal(run(pipe, PROMPTS, true_cfg_scale=2.0).images, a.images)


def test_a_folder_of_another_family_is_refused_naming_it(tiny):
    family, pipe = tiny
    if family != "sd3":
        pytest.skip("one family is enough")
    folder = FOLDERS[family]
    with pytest.raises(FamilyMismatch, match="holds a sd3 pipeline .* not flux .*set data.diffusion.family=sd3"):
        load_pipeline(DiffusionSpec(model_id=folder, family="flux", tokenizer="default", local_files_only=True))
