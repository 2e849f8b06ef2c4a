"""The VAE decoder's probe (``vae.mid``): registered opt-in, captured from each step's latent, equal to
the mid-block attention of a full ``vae.decode`` of that latent, stored and probed like a U-Net layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.layers import SD14_LAYERS, LayerRegistry, check_layer_patterns
from probes.diffusion.loading import DiffusionSpec
from probes.generation.capture import ActivationCapture
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate, make_scheduler
from probes.prompts.sets import PromptRecord, PromptSpec
from probes.training.datamodule import ActivationDataModule
from tests.conftest import REPO

RECS = [PromptRecord(index=i, prompt=f"a photo of a dog {i}", seed=i, split="test") for i in range(2)]


def test_vae_mid_is_registered_and_opt_in(tiny_pipe):
    reg = LayerRegistry.from_pipeline(tiny_pipe, (16, 16))
    assert [layer.name for layer in reg.select(["*"])] == list(SD14_LAYERS)        # '*' still means the U-Net's 16
    assert [layer.name for layer in reg.select("all")] == list(SD14_LAYERS)
    (vae,) = reg.select(["vae.mid"])
    assert vae.kind == "vae" and vae.in_vae and vae.grid == (16, 16)
    assert vae.channels == tiny_pipe.vae.config.block_out_channels[-1] == 32
    assert vae.module == "vae.decoder.mid_block.attentions.0.to_out.0"
    assert [layer.name for layer in reg.select(["*", "vae.mid"])] == [*SD14_LAYERS, "vae.mid"]
    assert reg.select(["vae.*"]) == [vae]
    check_layer_patterns(["*", "vae.mid"])
    with pytest.raises(ValueError, match="'vae.mud' names no layer.*vae.mid"):
        check_layer_patterns(["vae.mud"])
    with pytest.raises(ValueError, match="no classifier-free-guidance halves.*halves=cond"):
        ActivationCapture(tiny_pipe.unet, [vae], 4, halves="both")


def test_vae_mid_equals_the_mid_block_attention_of_a_full_decode(tiny_pipe):
    """Captured at each step from the latent after the step, as a full ``vae.decode`` of it computes."""
    reg = LayerRegistry.from_pipeline(tiny_pipe, (16, 16))
    layers = reg.select(["up3.0", "vae.mid"])
    cap = ActivationCapture(tiny_pipe.unet, layers, 4, steps=[0, 3], dtype=torch.float32)
    latents_seen = []
    tiny_pipe.scheduler = make_scheduler(tiny_pipe, "lms")     # one U-Net call per step (generate sets it too)

    def on_step_end(pipe, i, t, kwargs):
        latents_seen.append(kwargs["latents"].clone())
        return cap.on_step_end(pipe, i, t, kwargs)

    with cap, torch.inference_mode():
        tiny_pipe(prompt=[r.prompt for r in RECS], num_inference_steps=4, height=128, width=128,
                  generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=on_step_end)
    acts = cap.collect()
    assert acts["vae.mid"].shape == (2, 2, 1, 256, 32)        # [batch, captured steps, 'cond', 16x16 tokens, channels]
    vae = tiny_pipe.vae
    for slot, step in enumerate([0, 3]):
        seen: list[torch.Tensor] = []
        hook = vae.decoder.mid_block.attentions[0].to_out[0].register_forward_hook(
            lambda m, a, o, _seen=seen: _seen.append(o))
        with torch.inference_mode():
            vae.decode(latents_seen[step] / vae.config.scaling_factor)
        hook.remove()
        torch.testing.assert_close(acts["vae.mid"][:, slot, 0], seen[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(acts["vae.mid"][:, 0], acts["vae.mid"][:, 1])   # the latent changes between steps


def test_generate_stores_vae_mid_beside_the_unet_layers(tiny_pipe):
    reg = LayerRegistry.from_pipeline(tiny_pipe, (16, 16))
    capture = CaptureSpec(layers=["mid.0", "vae.mid"])
    plain = list(generate(tiny_pipe, RECS, [0, 1], GenerationSpec(steps=3, batch_size=2), reg.select(["mid.0"]),
                          CaptureSpec(layers=["mid.0"]), progress=False))[0]
    (batch,) = list(generate(tiny_pipe, RECS, [0, 1], GenerationSpec(steps=3, batch_size=2),
                             reg.select(capture.layers), capture, progress=False))
    assert batch.acts["vae.mid"].shape == (2, 3, 1, 256, 32) and batch.acts["vae.mid"].dtype == torch.float16
    assert torch.isfinite(batch.acts["vae.mid"].float()).all()
    assert batch.unet_calls == plain.unet_calls                   # the VAE's pass is not a U-Net call
    assert np.array_equal(batch.images, plain.images)             # reading the VAE changes nothing
    assert torch.equal(batch.acts["mid.0"], plain.acts["mid.0"])


def test_a_probe_trains_on_vae_mid_and_reports_it_as_its_own_layer(tmp_path):
    import pytorch_lightning as pl

    from probes.training.ridge import RidgeProbeModule

    d = ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny", precision="fp32", tokenizer="default"),
        prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=6, val_fraction=0.3),
        generation=GenerationSpec(steps=3, batch_size=4), capture=CaptureSpec(layers=["up3.0", "vae.mid"]),
        labels={"foreground": {"name": "otsu"}}, store_root=str(tmp_path), device="cpu", progress=False)
    module = RidgeProbeModule()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=d)
    results = trainer.test(module, datamodule=d, verbose=False)
    assert [layer["name"] for layer in d.store.manifest["capture"]["layers"]] == ["up3.0", "vae.mid"]
    assert d.store.activation("vae.mid", 0).shape == (3, 1, 256, 32)
    keys = [k for r in results for k in r if "vae.mid" in k]
    assert keys and all(np.isfinite(r[k]) for r in results for k in keys)
    # the report's rows: vae.mid is a layer of its own, after the U-Net's, in the heatmap and line plots
    from probes.reporting.plots import plot_heatmap, plot_metric_vs_step

    rows = module.results["test"]
    assert list(dict.fromkeys(r["layer"] for r in rows if r["task"] == "foreground")) == ["up3.0", "vae.mid"]
    assert plot_heatmap(rows, "test", "foreground", "dice", tmp_path / "h.png").stat().st_size > 0
    assert plot_metric_vs_step(rows, "test", "foreground", "dice", tmp_path / "l.png").stat().st_size > 0
