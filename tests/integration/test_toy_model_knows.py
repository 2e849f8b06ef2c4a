"""The trained toy model draws its world, and probes on it beat its permuted-weights control.

These are the demo's claims in small: they fail if the shipped model stopped drawing objects or
its activations stopped carrying the foreground.
"""
from __future__ import annotations

import numpy as np
import pytest

from probes.models.loading import DiffusionSpec, local_model_dir

pytestmark = pytest.mark.skipif(local_model_dir("data/toy/model") is None,
                                reason="data/toy/model absent (make toy-model)")


def test_generated_scenes_contain_objects_the_toy_labeler_finds():
    from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
    from probes.models.loading import load_pipeline
    from probes.prompts.sets import PromptSpec, load_prompts
    from probes.toy.sample_quality import sample_quality

    pipe = load_pipeline(DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True), "cpu")
    records = load_prompts(PromptSpec(source="toy"))[:8]
    spec = GenerationSpec(steps=15, guidance_scale=7.5, scheduler="lms", batch_size=8)
    (batch,) = list(generate(pipe, records, range(8), spec, [], CaptureSpec(layers=["*"]), progress=False))
    assert batch.images.shape == (8, 64, 64, 3) and np.isfinite(batch.images).all()
    q = sample_quality(batch.images, [r.prompt for r in records])
    assert q["object_found"] >= 0.75, q


def _best_test(run, task="foreground", metric="dice") -> float:
    from probes.reporting.tables import best_heads, read_metrics_csv

    (b,) = [b for b in best_heads(read_metrics_csv(run / "metrics.csv")) if b["task"] == task and b["metric"] == metric]
    return b["test"]


@pytest.mark.slow
def test_probes_on_the_toy_model_beat_its_permuted_control_on_foreground(tmp_path):
    from probes.cli.demo import demo

    small = ["--data.prompts.limit", "24", "--data.labels", "{foreground: {name: toy_foreground}}",
             "--data.store_root", str(tmp_path / "stores"), "--trainer.logger", "false", "--outputs.plots", "false",
             "--data.generation.decode_x0", "false"]
    demo(str(tmp_path / "demo"), overrides=small)
    model, control = _best_test(tmp_path / "demo" / "model"), _best_test(tmp_path / "demo" / "control")
    assert model > control + 0.1, (model, control)
    with open(tmp_path / "demo" / "comparison.md") as f:
        assert "permuted weights" in f.read()
