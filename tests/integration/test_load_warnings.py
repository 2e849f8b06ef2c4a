"""Loading a pipeline passes nothing diffusers deprecates (its ``torch_dtype`` FutureWarning)."""
from __future__ import annotations

import warnings

import torch

from probes.diffusion.loading import DiffusionSpec, load_pipeline


def test_loading_from_a_folder_raises_no_future_warning():
    """The toy world's model loads through the family's ``from_pretrained`` (the hub path), as sd14 does."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = load_pipeline(DiffusionSpec(source="hub", model_id="data/toy/model", family="sd1"), "cpu")
    # the dtype still reaches every component: the folder's fp16 weights are upcast (precision reference on a CPU)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
