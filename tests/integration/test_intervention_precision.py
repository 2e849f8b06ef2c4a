"""The intervention's unedited image is the store's image, under every precision a CPU runs.

The intervention regenerates the test images the probes were trained on; if its sampler ran in
another precision than the store's generation (it once hard-coded fp16 autocast on CUDA), its
"original" would not be the image the probes saw. Both go through one precision path
(``probes.generation.sampling.denoising``); here a zero-iteration edit (the editor writes back what
it reads) must give the stored image bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import PRECISIONS, DiffusionSpec, load_pipeline
from probes.experiments.intervention.editor import ActivationEditor, EditSettings
from probes.experiments.intervention.pipeline import sample_images
from probes.export.probeset import LinearProbe, ProbeInfo
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptRecord
from probes.store.fill import ensure_store

RECORDS = [PromptRecord(index=0, prompt="a red ball on a table", seed=7, split="test")]
SPEC = GenerationSpec(steps=2, batch_size=1)


def zero_edit(pipe, layer) -> ActivationEditor:
    info = ProbeInfo(key=f"foreground/{layer.name}/step_00", task="foreground", kind="binary", layer=layer.name,
                     step=0, timestep=0.0, channels=layer.channels, token_grid=layer.grid, label_size=(128, 128),
                     target_norm=None, threshold=0.0, metrics={})
    probe = LinearProbe(info, torch.randn(layer.channels, 2, generator=torch.Generator().manual_seed(0)))
    return ActivationEditor(pipe.unet, [probe], [layer], torch.zeros(len(RECORDS), 128, 128),
                            EditSettings(iterations=0))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_zero_edit_image_is_the_stored_image(tmp_path, precision):
    diffusion = DiffusionSpec(source="random", architecture="tiny", precision=precision)
    store = ensure_store(tmp_path / "store", RECORDS, diffusion, SPEC, CaptureSpec(layers=["mid.0"]), "cpu",
                         progress=False)
    pipe = load_pipeline(diffusion, "cpu")
    layer = LayerRegistry.from_unet(pipe.unet, (16, 16)).get("up1.0")
    editor = zero_edit(pipe, layer)
    edited = sample_images(pipe, RECORDS, SPEC, [editor])
    assert len(editor.records) == 1                        # the edit ran (and wrote back what it read)
    assert np.array_equal(edited, np.asarray(store.images.array()))
