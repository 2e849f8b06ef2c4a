"""Every model family through ``train.py fit`` on its tiny random config, offline (issue 22).

``configs/tiny_<family>.yaml``: the family's stock pipeline with tiny widths and random weights,
generation + capture of every default layer and step + classical labels (of the images and of the
decoded noisy latents) + one-pass ridge probes + the report, on six prompts (two per split). SD
v1.x's tiny run is ``tests/e2e/test_cli.py``'s demo. Family configs of the real models are checked
by the pre-flight test: what is missing before anything is downloaded, and what the store weighs.
"""
from __future__ import annotations

import csv
import json

import pytest

from probes.export.probeset import load_probes
from tests.e2e.test_cli import run_inprocess
from tests.e2e.test_preflight import empty_caches  # noqa: F401  (a fixture)

#: family -> (layers of its tiny model, CFG layout of its tiny config, readout of its first layer)
TINY = {
    "sd2": (16, "batched", "tokens"),
    "sdxl": (17, "batched", "tokens"),
    "sd3": (3, "batched", "second"),
    "pixart_alpha": (3, "batched", "tokens"),
    "pixart_sigma": (3, "batched", "tokens"),
    "flux": (4, "none", "second"),
}
QUICK = ["--data.prompts.limit", "2", "--trainer.logger", "false", "--data.progress", "false",
         "--outputs.panels", "0"]


@pytest.mark.parametrize("family", list(TINY))
def test_tiny_family_config_runs_end_to_end(tmp_path, family):
    n_layers, cfg, readout = TINY[family]
    run = tmp_path / "run"
    stdout = run_inprocess("fit", "--config", f"configs/tiny_{family}.yaml", *QUICK,
                           "--data.store_root", str(tmp_path / "stores"), "--run_dir", str(run))
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    cap = manifest["capture"]
    assert manifest["model"]["family"] == family and cap["cfg"] == cfg and len(cap["layers"]) == n_layers
    assert cap["layers"][0].get("readout", "tokens") == readout
    assert len(cap["timesteps"]) == len(cap["sigmas"]) == 4 and cap["steps"] == [0, 1, 2, 3]
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    probed = [r for r in rows if r["layer"] in {layer["name"] for layer in cap["layers"]}]
    assert {r["layer"] for r in probed} == {layer["name"] for layer in cap["layers"]}
    assert {r["task"] for r in probed} == {"foreground", "depth", "shading"}
    assert {float(r["timestep"]) for r in probed} == set(cap["timesteps"])
    assert {"decoded_noisy", "prior", "plane"} <= {r["layer"] for r in rows}      # the baselines' rows
    probes = load_probes(run / "probes")
    assert [layer.to_dict() for layer in probes.spec.layers] == cap["layers"]      # readout rules travel along
    assert (run / "report.html").is_file() and "Emergence" in (run / "report.md").read_text()
    assert "RANDOM WEIGHTS" in stdout


@pytest.mark.parametrize("config, needles", [
    ("configs/flux/all.yaml", ["hf download black-forest-labs/FLUX.1-schnell --revision 741f7c3c",
                               "licence: black-forest-labs/FLUX.1-schnell is gated", "hf auth login",
                               "per image at 1024x1024 (streaming: images only; cached, its 57 layers x 4 steps"]),
    ("configs/sd3/all.yaml", ["hf download stabilityai/stable-diffusion-3.5-medium",
                              "licence: stabilityai/stable-diffusion-3.5-medium is gated",
                              "cached, its 24 layers x 15 steps"]),
    ("configs/sdxl/all.yaml", ["hf download stabilityai/stable-diffusion-xl-base-1.0", "cached, its 70 layers"]),
    ("configs/sd2/all.yaml", ["hf download stabilityai/stable-diffusion-2-1", "at 768x768"]),
    ("configs/pixart_alpha/all.yaml", ["hf download PixArt-alpha/PixArt-XL-2-512x512", "cached, its 28 layers"]),
])
def test_real_family_configs_list_what_is_missing_before_any_download(tmp_path, empty_caches, config,  # noqa: F811
                                                                      needles):
    with pytest.raises(SystemExit) as done:
        run_inprocess("fit", "--config", config, "--run_dir", str(tmp_path / "run"),
                      "--data.store_root", str(tmp_path / "stores"), "--trainer.accelerator", "cpu",
                      env_extra=empty_caches)
    msg = str(done.value.code)
    for needle in needles:
        assert needle in msg, (needle, msg)
    if "sd2" in config or "sdxl" in config or "pixart" in config:
        assert "licence: " not in msg and "gated" not in msg     # not gated
    assert not (tmp_path / "run").exists() and not (tmp_path / "stores").exists()


def test_misspelt_family_and_layer_fail_at_parse_time_naming_the_valid_ones(tmp_path, capsys):
    for override, needle, valid in (
            (["--data.diffusion.family", "fluxx"], "unknown model family 'fluxx'", "sd1, sd2, sdxl, sd3"),
            (["--data.capture.layers", "[jiont1]"], "'jiont1' names no layer of model family flux", "joint<i>"),
            (["--data.generation.scheduler", "lms"], "flow-matching model", "scheduler=native")):
        with pytest.raises((SystemExit, KeyError, ValueError)) as err:
            run_inprocess("fit", "--config", "configs/tiny_flux.yaml", *override,
                          "--data.store_root", str(tmp_path / "s"), "--run_dir", str(tmp_path / "run"))
        message = str(err.value) + capsys.readouterr().err
        assert needle in message and valid in message, message
        assert not (tmp_path / "s").exists()
