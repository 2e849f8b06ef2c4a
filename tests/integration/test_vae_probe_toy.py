"""On the toy model, a foreground probe on the VAE decoder's ``vae.mid`` learns the object's mask,
better at the last step than at the first (the latent sharpens as it is denoised)."""
from __future__ import annotations

import pytest

from probes.diffusion.loading import DiffusionSpec, local_model_dir
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec
from probes.training.datamodule import ActivationDataModule

pytestmark = pytest.mark.skipif(local_model_dir("data/toy/model") is None,
                                reason="data/toy/model absent (make toy-model)")


@pytest.mark.slow
def test_foreground_probe_on_vae_mid_learns_on_the_toy_model(tmp_path):
    import pytorch_lightning as pl

    from probes.training.ridge import RidgeProbeModule

    d = ActivationDataModule(
        diffusion=DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True, precision="fp32",
                                tokenizer="default"),
        prompts=PromptSpec(source="toy", limit=40, val_fraction=0.2),
        generation=GenerationSpec(steps=15, batch_size=8), capture=CaptureSpec(layers=["vae.mid"], steps=[0, 14]),
        labels={"foreground": {"name": "toy_foreground"}}, store_root=str(tmp_path), device="cpu", progress=False)
    module = RidgeProbeModule()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=d)
    (res,) = trainer.test(module, datamodule=d, verbose=False)
    dice = {s: v for k, v in res.items() for s in (0, 14) if "dice" in k and "vae.mid" in k and k.endswith(f"{s:02d}")}
    assert set(dice) == {0, 14}, sorted(res)
    # measured with 189 scenes (README): test Dice 0.024 at step 0, 0.634 at step 14 (up3.0: 0.450 -> 0.840)
    assert dice[14] > 0.3 and dice[14] > dice[0] + 0.2, dice
