"""``diffusion-probes intervene`` with latent guidance, both modes and side effects, on the tiny random model."""
from __future__ import annotations

import math

import pytest

from probes.experiments.intervention.config import InterventionConfig
from probes.experiments.intervention.run import intervene
from tests.integration.test_intervention import export, read  # noqa: F401  (the module-scoped export fixture)

SMALL = dict(task="foreground", layers=["up3*"], steps=[0, 1], images=2, batch_size=2, progress=False)


def test_latent_mode_with_weight_zero_reproduces_every_original_image(export, tmp_path):  # noqa: F811
    out = intervene(InterventionConfig(str(export), mode="latent", guidance_weight=0.0, out=str(tmp_path / "w0"),
                                       **SMALL))
    rows = read(out / "per_image.csv")
    assert {r["condition"] for r in rows} == {"edit", "noop", "random"}
    mae = [float(r["value"]) for r in rows if r["metric"] == "pixel_mae"]
    psnr = [float(r["value"]) for r in rows if r["metric"] == "pixel_psnr"]
    assert len(mae) == len(psnr) == 3 * 2 and all(v == 0 for v in mae) and all(math.isinf(v) for v in psnr)
    shifts = [float(r["value"]) for r in rows if r["metric"] == "colour_shift"]
    assert len(shifts) == 6 and all(math.isnan(v) or v == 0 for v in shifts)    # same image, same mask
    assert not any(r["metric"] == "same_class" for r in rows)     # no classifier for the tiny model's images
    report = (out / "report.md").read_text()
    assert "| same_class | n/a | n/a | n/a |" in report and "pixel_psnr" in report and "colour_shift" in report


def test_both_modes_write_one_table_and_the_activation_mode_matches_its_own_run(export, tmp_path):  # noqa: F811
    alone = intervene(InterventionConfig(str(export), iterations=2, out=str(tmp_path / "act"), **SMALL))
    both = intervene(InterventionConfig(str(export), iterations=2, mode="both", guidance_weight=0.05,
                                        out=str(tmp_path / "both"), **SMALL))
    solo = {(r["index"], r["condition"], r["metric"]): r["value"] for r in read(alone / "per_image.csv")}
    rows = read(both / "per_image.csv")
    assert {r["condition"] for r in rows} == {f"{m}/{c}" for m in ("activation", "latent")
                                              for c in ("edit", "noop", "random")}
    paired = {(r["index"], r["condition"].split("/")[1], r["metric"]): r["value"] for r in rows
              if r["condition"].startswith("activation/")}
    assert paired == solo                                        # the activation mode is today's edit
    latent_mae = [float(r["value"]) for r in rows if r["condition"] == "latent/edit" and r["metric"] == "pixel_mae"]
    assert all(v > 0 for v in latent_mae)                        # the guided latent changed the images
    report = (both / "report.md").read_text()
    assert "## Edit modes" in report and "| activation |" in report and "| latent |" in report
    assert report.count("**[") == 2                              # one verdict per mode
    assert (both / "grid_latent_edit.png").stat().st_size > 0


def test_mode_and_guidance_options_are_checked_before_any_compute(export, tmp_path):  # noqa: F811


    with pytest.raises(ValueError, match="mode must be one of"):
        InterventionConfig(str(export), mode="sideways")
    with pytest.raises(ValueError, match="guidance_weight"):
        InterventionConfig(str(export), mode="latent", guidance_weight=-1.0)
    with pytest.raises(ValueError, match="latent mode edits no activation"):
        InterventionConfig(str(export), mode="latent", erase=["colour"])


def test_erase_names_the_missing_store_before_loading_the_model(export, tmp_path):  # noqa: F811


    with pytest.raises(FileNotFoundError, match="erase: \\['colour'\\] fits LEACE on the probes' store"):
        intervene(InterventionConfig(str(export), erase=["colour"], out=str(tmp_path / "e"), **SMALL))


@pytest.mark.slow
def test_toy_model_both_modes_with_erasure_measure_every_side_effect(tmp_path):
    """On the toy model: fit mean-difference foreground probes on a few fresh scenes, then run both
    edit modes with colour and class erased; every side effect is measured, the classifier's too."""
    from tests.e2e.test_cli import run_inprocess

    run_dir = tmp_path / "probes_run"
    run_inprocess("fit", "--config", "configs/toy/mean_difference.yaml", "--run_dir", str(run_dir),
                  "--data.store_root", str(tmp_path / "stores"), "--data.prompts.limit", "40",
                  "--data.capture.layers", "[up*]", "--data.capture.steps", "[0, 1, 2, 3, 4]",
                  "--data.labels", "{foreground: {name: toy_foreground}}", "--data.generation.decode", "none",
                  "--classifier.name", "null", "--trainer.logger", "false", "--outputs.plots", "false")
    out = intervene(InterventionConfig(str(run_dir / "probes"), task="foreground", images=2, mode="both",
                                       erase=["colour", "class"], erase_samples=16, guidance_weight=0.05,
                                       out=str(tmp_path / "toy"), progress=False))
    summary = {(r["condition"], r["metric"]): float(r["value"]) for r in read(out / "metrics.csv")}
    for mode in ("activation", "latent"):
        for metric in ("success_rate", "pixel_mae", "pixel_psnr", "colour_shift", "same_class", "probe_loss_after"):
            assert (f"{mode}/edit", metric) in summary, (mode, metric)
        assert 0 <= summary[(f"{mode}/noop", "same_class")] <= 1
    report = (out / "report.md").read_text()
    assert "erase: `['colour', 'class']`" in report and "erased_directions" in report
