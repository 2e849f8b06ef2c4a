"""Every family end to end on a tiny random pipeline saved as a folder and reloaded offline.

Per family, with the stock pipeline class: (a) two images with capture on three layers, steps and
the scheduler's timesteps recorded; (b) the captured readout equals a direct forward of the same
module on the same inputs, rule applied; for transformers, a block's image tokens are what the
model hands the next module; (c) the conditional half is the one the text changes; (d) the image is
bit-identical with and without capture. FLUX also runs with true CFG (two calls per step).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_map

from probes.diffusion.families.layers import registry_for
from probes.diffusion.families.loading import family_of_folder, load_family_pipeline
from probes.diffusion.families.readout import read_tokens
from probes.diffusion.families.run import generate
from probes.diffusion.families.spec import get_family
from probes.diffusion.families.tiny import build_tiny_pipeline, save_tiny_pipeline

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


def options(family: str, **kw):
    """Call options: K-LMS for SD 1.x (PNDM, its hub scheduler, calls the U-Net once more than it has
    steps), short T5 sequences for the transformers."""
    opts = dict(steps=STEPS, height=SIZE, width=SIZE, dtype=torch.float32)
    if family == "sd1":
        opts["scheduler"] = "LMSDiscreteScheduler"
    if not get_family(family).is_unet:
        opts["max_sequence_length"] = 16
    return {**opts, **kw}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    family = request.param
    folder = save_tiny_pipeline(family, tmp_path_factory.mktemp(family) / "pipeline")
    assert family_of_folder(folder).name == family
    pipe = load_family_pipeline(folder, local_files_only=True)
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


def test_reloaded_folder_generates_what_the_built_pipeline_does(tiny):
    """Weights, configs and tokenizers survive save_pretrained/from_pretrained. Each runs its own
    scheduler: one swapped in with ``from_config`` would not match, because the saved config spells
    out every default (PNDM's ``timestep_spacing: leading``) that the in-memory one leaves to the
    new class (K-LMS: ``linspace``)."""
    family, pipe = tiny
    built = build_tiny_pipeline(family)
    opts = {k: v for k, v in options(family).items() if k != "scheduler"}
    a = generate(pipe, PROMPTS, SEEDS, capture=False, **opts)
    b = generate(built, PROMPTS, SEEDS, capture=False, **opts)
    assert np.array_equal(a.images, b.images)
    assert type(pipe).__name__ == get_family(family).pipeline
    for path, value in FAMILY_FACTS.get(family, {}).items():
        obj = pipe
        for part in path.split("."):
            obj = getattr(obj, part)
        assert (type(obj).__name__ if path.count(".") == 0 else obj) == value, path


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


def test_capture_shapes_steps_and_timesteps(tiny):
    family, pipe = tiny
    layers = layers_of(family, pipe)
    guided = get_family(family).guidance == "cfg"
    batch = generate(pipe, PROMPTS, SEEDS, layers, halves="both" if guided else "cond", **options(family))
    assert batch.images.shape == (2, SIZE, SIZE, 3)
    for info in layers:
        assert batch.acts[info.name].shape == (2, STEPS, 2 if guided else 1, info.tokens, info.channels)
    assert batch.steps == list(range(STEPS)) and batch.denoiser_calls == STEPS
    assert batch.timesteps == [float(t) for t in pipe.scheduler.timesteps]   # step i <-> the scheduler's i-th
    if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":   # flow matching: t = 1000 sigma
        np.testing.assert_allclose(batch.sigmas, np.array(batch.timesteps) / 1000, rtol=1e-5)
        assert batch.sigmas[0] == 1.0


def test_capture_equals_a_direct_forward_of_the_module(tiny):
    family, pipe = tiny
    layers = layers_of(family, pipe, kinds=None if get_family(family).is_unet else ("block", "attn"),
                       names=LAYERS[family] + ([] if get_family(family).is_unet else [LAYERS[family][-1] + ".attn"]))
    step = STEPS - 1
    rec = InputRecorder(pipe, family, [info.module for info in layers], calls={step})
    try:
        batch = generate(pipe, PROMPTS, SEEDS, layers, halves="both" if get_family(family).guidance == "cfg"
                         else "cond", **options(family))
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
    reg = registry_for(pipe, SIZE, SIZE)
    blocks = list(reg)
    rec = InputRecorder(pipe, family, [b.module for b in blocks] + ["norm_out"], calls={0})
    try:
        batch = generate(pipe, PROMPTS, SEEDS, blocks, halves="both" if family != "flux" else "cond",
                         **options(family))
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
    guided = get_family(family).guidance == "cfg"
    halves = "both" if guided else "cond"
    a = generate(pipe, PROMPTS, SEEDS, layers, halves=halves, **options(family))
    b = generate(pipe, OTHER, SEEDS, layers, halves=halves, **options(family))
    for info in layers:
        xa, xb = a.acts[info.name], b.acts[info.name]
        cond = xa.shape[2] - 1
        if (family, info.name) in TEXT_FREE_AT_STEP0:
            assert torch.equal(xa[0, 0], xb[0, 0]), info.name
            continue
        assert (xa[0, 0, cond] - xb[0, 0, cond]).abs().max() > 1e-3 * xa[0, 0, cond].abs().max(), info.name
        if guided:
            assert torch.equal(xa[0, 0, 0], xb[0, 0, 0]), info.name
        torch.testing.assert_close(xa[1], xb[1], rtol=1e-5, atol=1e-6)
    if not guided:
        with pytest.raises(ValueError, match="needs classifier-free guidance"):
            generate(pipe, PROMPTS, SEEDS, layers, halves="both", **options(family))


def test_image_is_bit_identical_with_and_without_capture(tiny):
    family, pipe = tiny
    plain = generate(pipe, PROMPTS, SEEDS, capture=False, **options(family))
    captured = generate(pipe, PROMPTS, SEEDS, layers_of(family, pipe), **options(family))
    assert np.array_equal(plain.images, captured.images)


def test_flux_true_cfg_runs_two_calls_per_step_cond_first(tiny):
    """FLUX's true CFG: the capture reassembles [uncond, cond] from two calls per step; the text
    moves only the conditional half, and the halves equal direct forwards of their own calls."""
    family, pipe = tiny
    if family != "flux":
        pytest.skip("true CFG is FLUX's")
    layers = layers_of(family, pipe, ["joint0", "single1"])
    opts = options(family, true_cfg_scale=2.0, halves="both")
    rec = InputRecorder(pipe, family, [info.module for info in layers], calls={0, 1})
    try:
        a = generate(pipe, PROMPTS, SEEDS, layers, **opts)
    finally:
        rec.remove()
    b = generate(pipe, OTHER, SEEDS, layers, **opts)
    assert a.cfg == "sequential" and a.denoiser_calls == 2 * STEPS
    for info in layers:
        cond_call = read_tokens(info, rec.rerun(info.module, 0))
        uncond_call = read_tokens(info, rec.rerun(info.module, 1))
        torch.testing.assert_close(a.acts[info.name][:, 0, 1], cond_call, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.acts[info.name][:, 0, 0], uncond_call, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.acts[info.name][0, 0, 0], b.acts[info.name][0, 0, 0])
        assert not torch.equal(a.acts[info.name][0, 0, 1], b.acts[info.name][0, 0, 1])
    plain = generate(pipe, PROMPTS, SEEDS, capture=False, **{k: v for k, v in opts.items() if k != "halves"})
    assert np.array_equal(plain.images, a.images)
