"""SD v1.x stores keep their fingerprints (and so their folders) after the model families arrived.

The values were computed on main before ``diffusion.family``, ``generation.true_cfg_scale`` and
``generation.max_sequence_length`` existed (commit 7d86e55): hours of SD v1.4 generation must not
be orphaned by a new option left at its SD v1.x value. The three hub rows changed once, on purpose,
when SD v1.4's default revision was pinned from ``main`` to commit 133a221b (issue 18, item 4): the
revision is part of the model's identity, and a store made before the pin is reused by setting
``diffusion.revision: main`` (README, "What is and is not pinned"). The toy model's row changed when the
V2 model shipped (issue 20): a shipped folder's identity is its weights' checksums, and new weights
must not reuse the old model's store.
"""
from __future__ import annotations

import pytest

from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptRecord
from probes.store.manifest import request_fingerprint, store_request

RECORDS = [PromptRecord(index=i, prompt=f"p{i}", seed=i, split="train" if i < 3 else "test") for i in range(4)]
TINY = DiffusionSpec(source="random", architecture="tiny", precision="fp32", tokenizer="default")


@pytest.mark.parametrize("diffusion, generation, fingerprint", [
    (TINY, GenerationSpec(), "61a6932022f1"),
    (TINY, GenerationSpec(steps=3, batch_size=2, decode="noisy"), "0f8b0a119cee"),
    (DiffusionSpec(), GenerationSpec(), "4196c0da5794"),
    (DiffusionSpec(), GenerationSpec(steps=3, batch_size=2, decode="noisy"), "851d4602cdf4"),
    (DiffusionSpec(model_id="data/toy/model"), GenerationSpec(), "6960a3c920be"),
    (DiffusionSpec(permute_seed=0), GenerationSpec(), "f23a9ddfcb8f"),
])
def test_sd1_store_fingerprints_are_unchanged(diffusion, generation, fingerprint):
    assert diffusion.family_name == "sd1"
    assert request_fingerprint(store_request(diffusion, generation, CaptureSpec(), RECORDS)) == fingerprint


def test_revision_main_keeps_the_fingerprint_stores_had_before_the_pin():
    before_pin = DiffusionSpec(revision="main")
    assert request_fingerprint(store_request(before_pin, GenerationSpec(), CaptureSpec(), RECORDS)) == "2266703db16b"


def test_the_new_options_enter_the_fingerprint_when_set():
    base = request_fingerprint(store_request(TINY, GenerationSpec(), CaptureSpec(), RECORDS))
    assert request_fingerprint(store_request(TINY, GenerationSpec(max_sequence_length=77), CaptureSpec(), RECORDS)) != base
    assert request_fingerprint(store_request(TINY, GenerationSpec(true_cfg_scale=2.0), CaptureSpec(), RECORDS)) != base
    flux = DiffusionSpec(source="random", architecture="tiny_flux", tokenizer="default", precision="fp32")
    assert store_request(flux, GenerationSpec(), CaptureSpec(), RECORDS)["model"]["family"] == "flux"
