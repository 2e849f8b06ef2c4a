"""``diffusion-probes intervene`` with latent guidance, both modes and side effects, on the tiny random model."""
from __future__ import annotations

import math

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
    import pytest

    with pytest.raises(ValueError, match="mode must be one of"):
        InterventionConfig(str(export), mode="sideways")
    with pytest.raises(ValueError, match="guidance_weight"):
        InterventionConfig(str(export), mode="latent", guidance_weight=-1.0)
    with pytest.raises(ValueError, match="latent mode edits no activation"):
        InterventionConfig(str(export), mode="latent", erase=["colour"])


def test_erase_names_the_missing_store_before_loading_the_model(export, tmp_path):  # noqa: F811
    import pytest

    with pytest.raises(FileNotFoundError, match="erase: \\['colour'\\] fits LEACE on the probes' store"):
        intervene(InterventionConfig(str(export), erase=["colour"], out=str(tmp_path / "e"), **SMALL))
