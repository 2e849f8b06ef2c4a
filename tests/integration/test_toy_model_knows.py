"""The trained toy model draws its world, and probes on it beat its permuted-weights control.

These are the demo's claims in small: they fail if the shipped model stopped drawing objects or
its activations stopped carrying the foreground.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binomtest

from probes.diffusion.loading import DiffusionSpec, local_model_dir

pytestmark = pytest.mark.skipif(local_model_dir("data/toy/model") is None,
                                reason="data/toy/model absent (make toy-model)")


def test_generated_scenes_contain_objects_the_toy_labeler_finds():
    from probes.diffusion.loading import load_pipeline
    from probes.experiments.toy.sample_quality import sample_quality
    from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
    from probes.prompts.sets import PromptSpec, load_prompts

    pipe = load_pipeline(DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True), "cpu")
    records = load_prompts(PromptSpec(source="toy"))[:8]
    spec = GenerationSpec(steps=15, guidance_scale=7.5, scheduler="lms", batch_size=8)
    (batch,) = list(generate(pipe, records, range(8), spec, [], CaptureSpec(layers=["*"]), progress=False))
    assert batch.images.shape == (8, 64, 64, 3) and np.isfinite(batch.images).all()
    q = sample_quality(batch.images, [r.prompt for r in records])
    assert q["object_found"] >= 0.75, q


@pytest.mark.xfail(strict=True, reason=(
    "issue 20's sample-quality test, unmet by the shipped V2 model (5,000 U-Net steps): here 7/24 (model) vs "
    "10/24 (control); on 200 captions (diffusion-probes toy-quality) 38.0 % [31.2, 45.1] vs 27.0 % [21.0, 33.7], "
    "too small a gap for 24 images. Strict: a model that passes turns this into a failure, so the mark goes"))
def test_classifier_names_the_captions_shape_more_often_on_the_model_than_on_its_control():
    """Issue 20's sample-quality claim in small: 24 fresh one-object captions, one image each."""
    from probes.experiments.toy.quality_run import generated_images, quality_captions
    from probes.experiments.toy.sample_quality import measures
    from probes.generation.sampling import GenerationSpec

    captions = quality_captions(24, 0)
    spec = DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True, precision="fp32",
                         tokenizer="default")
    control = replace(spec, permute_seed=0)
    generation = GenerationSpec(steps=15, guidance_scale=7.5, scheduler="lms", batch_size=12)
    named = {name: measures(generated_images(s, captions, generation, progress=False), captions)["shape_named"]
             for name, s in (("model", spec), ("control", control))}
    assert named["model"].n == named["control"].n == 24
    assert named["model"].rate > named["control"].rate + 0.2, named


def test_noisy_latent_decodes_start_as_noise_and_end_as_the_image_unlike_x0():
    """The replication's baseline decodes x_{t-1}: noise early on, the final image at the last step; the
    predicted x0 looks like the scene from step 0, so labelers on it "succeed" far earlier."""
    from probes.diffusion.loading import load_pipeline
    from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
    from probes.prompts.sets import PromptSpec, load_prompts

    pipe = load_pipeline(DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True), "cpu")
    records = load_prompts(PromptSpec(source="toy"))[:4]
    out = {}
    for decode in ("noisy", "x0"):
        spec = GenerationSpec(steps=15, guidance_scale=7.5, scheduler="lms", batch_size=4, decode=decode)
        (out[decode],) = list(generate(pipe, records, range(4), spec, [], CaptureSpec(steps=[0, 7, 14]), progress=False))
    noisy, x0 = out["noisy"], out["x0"]
    assert np.array_equal(noisy.images, x0.images)

    def dist(b, k):
        return float(np.abs(b.decoded_images[:, k].astype(float) - b.images.astype(float)).mean())

    # measured on these 4 scenes, step 0 mean |difference| in uint8 levels: V2 model 56 (noisy) vs 37 (x0);
    # the V1 model (8 scenes) 64 vs 26. Step 14: 0 vs 0
    assert dist(noisy, 0) > dist(x0, 0) and dist(noisy, 0) > 30
    assert dist(noisy, 1) > dist(x0, 1)
    assert np.array_equal(noisy.decoded_images[:, 2], noisy.images)   # x_{S-1} is the final latent


def test_toy_classifier_on_decoded_noisy_images_finds_the_prompts_shape_by_the_last_step(tmp_path):
    """The replication's classifier experiment, offline: the toy shape classifier on the noisy latent
    decoded after each step of one-object scenes ("a red cube"). Chance is 1/4 (four shapes).
    Measured here (32 test scenes) on the V1 model: top-1 0.03 / 0.16 / 0.63 at steps 0 / 7 / 14, probability
    of the prompt's shape 0.39 / 0.62 / 0.61; on the V2 model top-1 0.28 / 0.03 / 0.44. The full
    configs/toy/classifier.yaml run (48 test scenes), V2 model: top-1 0.27 at step 0, 0.23-0.29 up to step 7,
    0.48 at step 11, 0.52 at step 14 (V1: 0.52 at step 9, 0.67 at steps 13-14)."""
    from probes.experiments.classify.stage import classifier_rows
    from probes.generation.sampling import CaptureSpec, GenerationSpec
    from probes.prompts.sets import PromptSpec
    from probes.training.datamodule import ActivationDataModule

    dm = ActivationDataModule(
        diffusion=DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True),
        prompts=PromptSpec(source="toy_classes", limit=32, val_fraction=0.0),
        generation=GenerationSpec(steps=15, guidance_scale=7.5, batch_size=16, decode="noisy"),
        capture=CaptureSpec(layers=["mid.0"], steps=[0, 7, 14]), labels={"foreground": {"name": "toy_foreground"}},
        store_root=str(tmp_path), device="cpu", progress=False)
    dm.setup("test")
    rows = classifier_rows({"name": "toy"}, dm)
    top1 = {r["step"]: r["value"] for r in rows if r["metric"] == "top1"}
    prob = {r["step"]: r["value"] for r in rows if r["metric"] == "prob"}
    assert len(dm.datasets["test"].indices) == 32
    # above chance (0.25) by a one-sided binomial test; the V1 model had 0.63 at step 14, the V2 model 0.44
    assert binomtest(round(top1[14] * 32), 32, 0.25, alternative="greater").pvalue < 0.05, top1
    assert top1[14] > top1[0] + 0.15, (top1, prob)
    # not asserted: the probability of the prompt's shape rising. The V2 classifier (trained with noise and
    # blur augmentation) gives every shape a high probability on the step-0 noise: prob 0.65 / 0.31 / 0.38
    # at steps 0 / 7 / 14 while top-1 sits at chance at step 0 (V1 classifier: 0.39 / 0.62 / 0.61)


def _best_test(run, task="foreground", metric="dice") -> float:
    from probes.reporting.tables import best_heads, read_metrics_csv

    (b,) = [b for b in best_heads(read_metrics_csv(run / "metrics.csv")) if b["task"] == task and b["metric"] == metric]
    return b["test"]


@pytest.mark.slow
def test_probes_on_the_toy_model_beat_its_permuted_control_on_foreground(tmp_path):
    from probes.cli.demo import RUNS, demo

    small = ["--data.prompts.limit", "24", "--data.labels", "{foreground: {name: toy_foreground}}",
             "--data.store_root", str(tmp_path / "stores"), "--trainer.logger", "false", "--outputs.plots", "false",
             "--data.generation.decode", "none", "--classifier.name", "null"]
    demo(str(tmp_path / "demo"), overrides=small, runs=RUNS[:2], classifier_run=None)   # the model, the permuted control
    model = _best_test(tmp_path / "demo" / "model")
    control = _best_test(tmp_path / "demo" / "control_permuted_own_images")
    assert model > control + 0.1, (model, control)
    with open(tmp_path / "demo" / "comparison.md") as f:
        assert "model − control_permuted_own_images" in f.read()
