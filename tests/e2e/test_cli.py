"""End to end through the README's commands: the tiny demo, evaluate.py, and the sd14 configs on
the random-weight path. The demo runs in-process (the same entry point as ``train.py``); the
tests that start a real process are marked ``slow`` (``make test-all``)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from probes.export.probeset import load_probes
from probes.store.activations import ActivationStore
from tests.conftest import REPO

N_HEADS = 16 * 15


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_inprocess(*args: str, env_extra: dict | None = None, cwd: os.PathLike | str = REPO) -> str:
    """``train.py`` in this process (its entry point, its argv): stdout, for the demo's printed summary.
    Configs are named relative to the repository (``cwd``), as in the README."""
    from probes.cli.main import train_main

    env = {"WANDB_MODE": "offline", **(env_extra or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            train_main(list(args))
    except SystemExit as done:          # --print_config and --help exit 0 after printing
        if done.code not in (0, None):
            raise
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    stdout = run_inprocess("fit", "--config", "configs/tiny.yaml", "--run_dir", str(tmp / "run"),
                           "--data.store_root", str(tmp / "stores"), "--data.prompts.limit", "4",
                           "--trainer.max_epochs", "2")
    return tmp / "run", stdout


def test_demo_writes_every_output(demo_run):
    run, stdout = demo_run
    for name in ("config.yaml", "metrics.csv", "summary.json", "probes/probes.json", "probes/probes.safetensors",
                 "per_image.npz"):
        assert (run / name).is_file(), name
    assert (run / "store" / "manifest.json").is_file()  # link to the activation store
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "test_depth_spearman_vs_step.png" in pngs and "test_foreground_dice_heatmap.png" in pngs
    assert len([p for p in pngs if p.startswith("test_")]) == 3 * (1 + 3 + 3)   # vs step, heatmap, gain heatmap
    assert "test_depth_spearman_gain_heatmap.png" in pngs
    assert list((run / "wandb").glob("offline-run-*")), "W&B should log offline when no API key is set"
    report = (run / "report.md").read_text()
    assert (run / "report.html").is_file() and "Knowledge beyond position" in report and "gain over position" in report
    assert "Emergence relative to the prior map" in report
    assert {"panel_depth.png", "panel_foreground.png", "panel_shading.png"} <= set(pngs)
    # probe vs labeler on decoded noisy images (no classifier configured), one per task
    assert {"emergence_depth.png", "emergence_foreground.png", "emergence_shading.png"} <= set(pngs)
    assert "RANDOM WEIGHTS" in stdout and "meaningless" in stdout
    assert "python train.py fit --config configs/sd14/all.yaml" in stdout
    assert "Best (layer, step) per task and metric" in stdout


def test_metrics_csv_is_long_form_and_complete(demo_run):
    run, _ = demo_run
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["split", "task", "layer", "step", "timestep", "metric", "value", "with_prior", "gain"]
    per_split = {"foreground": 2, "depth": 4, "shading": 4}  # metrics + loss
    probe_rows = [r for r in rows if r["layer"] not in ("decoded_noisy", "prior", "plane")]
    assert len(probe_rows) == 2 * N_HEADS * sum(per_split.values())
    # every probe head also has its activation+prior head's score and its gain over the prior map
    scored = [r for r in probe_rows if r["metric"] != "loss"]
    assert all(r["with_prior"] and r["gain"] for r in scored)
    decoded = [r for r in rows if r["layer"] == "decoded_noisy"]  # labelers on decoded noisy latents (demo has it on)
    assert len(decoded) == 15 * (1 + 3 + 3) and {r["split"] for r in decoded} == {"test"}
    for name in ("prior", "plane"):     # the position baselines, one value per step, val and test
        position = [r for r in rows if r["layer"] == name]
        assert len(position) == 2 * 15 * (1 + 3 + 3) and {r["split"] for r in position} == {"val", "test"}
    r = next(r for r in rows if r["layer"] == "up3.0" and r["step"] == "3" and r["split"] == "test")
    assert float(r["timestep"]) == pytest.approx(784.93, abs=0.01)
    assert all(np.isfinite(float(r["value"])) for r in rows)


def test_offline_wandb_run_holds_tables_charts_panels_and_the_artifact(demo_run):
    run, _ = demo_run
    (wb,) = list((run / "wandb").glob("offline-run-*"))
    media = wb / "files" / "media"
    (metrics,) = list((media / "table" / "results").glob("metrics_*.table.json"))
    table = json.loads(metrics.read_text())
    assert table["columns"] == ["split", "task", "layer", "step", "timestep", "metric", "value", "with_prior", "gain"]
    (beyond,) = list((media / "table" / "results").glob("beyond_position_*.table.json"))
    quantities = {row[3] for row in json.loads(beyond.read_text())["data"]}
    assert {"probe", "prior", "plane", "gain", "probe − prior"} <= quantities
    with open(run / "metrics.csv") as f:
        assert len(table["data"]) == sum(1 for _ in f) - 1  # the same rows as metrics.csv
    charts = {p.name.split("_")[0] for p in (media / "table" / "charts" / "test" / "depth" / "spearman").glob("*.json")}
    assert charts == {"vs", "heatmap"}
    assert list((media / "images" / "plots").glob("emergence_depth_*.png"))   # the emergence figure, logged
    panel = json.loads(next((media / "table" / "panels").glob("depth_*.table.json")).read_text())
    assert panel["columns"][-3:] == ["image", "label", "prediction"] and len(panel["data"]) == 4 * 15
    log = next(wb.glob("run-*.wandb")).read_bytes()
    assert b"probes-" in log and b"probes.safetensors" in log and b"probes.json" in log  # the artifact


def test_export_reloads_into_working_probes(demo_run):
    run, _ = demo_run
    probes = load_probes(run / "probes")
    assert len(probes) == 3 * N_HEADS
    meta = json.loads((run / "probes" / "probes.json").read_text())
    assert meta["model"]["model_id"] == "random:tiny" and meta["code_version"]
    entry = next(e for e in meta["probes"] if e["key"] == "depth/up3.0/step_03")
    assert entry["token_grid"] == [16, 16] and entry["channels"] == 32 and entry["timestep"] == pytest.approx(784.93, abs=0.01)
    assert set(entry["target_norm"]) == {"mean", "std"} and "test" in entry["metrics"]
    store = ActivationStore(run / "store")
    acts = torch.from_numpy(np.array(store.activation("up3.0", 0)[3, 0]))[None].float()  # step 3, cond half
    depth = probes.get("depth", "up3.0", 3).predict(acts)
    fg = probes.get("foreground", "up3.0", 3).predict(acts)
    assert depth.shape == (1, 128, 128) and fg.shape == (1, 128, 128) and fg.dtype == torch.bool
    with pytest.raises(ValueError, match=r"expects activations \[batch, 256, 32\].*got \(1, 64, 32\)"):
        probes.get("depth", "up3.0", 3)(acts[:, :64])
    with pytest.raises(KeyError, match="layers"):
        probes.get("depth", "up9.0", 3)


def test_evaluate_reproduces_the_test_metrics(demo_run, tmp_path):
    run, _ = demo_run
    from probes.cli.main import evaluate_main

    evaluate_main(["--probes", str(run / "probes"), "--out", str(tmp_path / "eval"),
                   "--store_root", str(run.parent / "stores")])   # the demo's store root: its store is found again
    read = lambda p: [r for r in csv.DictReader(open(p)) if r["split"] == "test"]  # noqa: E731
    ours, theirs = read(run / "metrics.csv"), read(tmp_path / "eval" / "metrics.csv")
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert (a["task"], a["layer"], a["step"], a["metric"]) == (b["task"], b["layer"], b["step"], b["metric"])
        assert float(a["value"]) == pytest.approx(float(b["value"]), abs=1e-6)
    assert (tmp_path / "eval" / "plots" / "test_shading_pearson_heatmap.png").is_file()


def test_saved_config_reruns_from_another_folder(demo_run, tmp_path):
    """The run's ``config.yaml`` names no file relative to where the run started (its labels group is
    inline, its bases are applied): it parses from any folder, to the same config."""
    run, _ = demo_run
    saved = (run / "config.yaml").read_text()
    assert "labels/classical.yaml" not in saved and "otsu" in saved
    text = run_inprocess("fit", "--config", str(run / "config.yaml"), "--print_config", cwd=tmp_path)
    assert "name: otsu" in text and "labels/classical.yaml" not in text


def test_printed_config_reruns_from_another_folder(tmp_path):
    """``--print_config`` of a config with ``defaults:`` and relative group paths (``../labels/toy.yaml``)
    is self-contained: printed again from another folder, it is the same config."""
    printed = run_inprocess("fit", "--config", "configs/toy/control_permuted_own_images.yaml", "--print_config")
    assert "../labels/toy.yaml" not in printed and "toy_foreground" in printed
    (tmp_path / "control.yaml").write_text(printed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = run_inprocess("fit", "--config", str(tmp_path / "control.yaml"), "--print_config", cwd=elsewhere)
    assert again == printed


@pytest.mark.parametrize("config", ["foreground", "depth", "shading", "all"])
def test_sd14_configs_parse_with_the_protocol(config):
    text = run_inprocess("fit", "--config", f"configs/sd14/{config}.yaml", "--print_config")
    for needle in ("model_id: CompVis/stable-diffusion-v1-4", "steps: 15", "guidance_scale: 7.5", "scheduler: lms",
                   "height: 512", "source: chen2023", "max_epochs: 30", "halves: cond"):
        assert needle in text, needle


@pytest.mark.slow
def test_sd14_config_runs_on_the_random_weight_path(tmp_path):
    """The real config, with only the model swapped for the tiny random one and a small prompt set."""
    cli("train.py", "fit", "--config", "configs/sd14/depth.yaml", "--data.diffusion", "configs/diffusion/tiny.yaml",
        "--data.generation.height", "128", "--data.generation.width", "128",
        "--data.labels", "{depth: {name: vertical}}", "--data.prompts.source", "data/prompts/demo.txt",
        "--data.prompts.limit", "2", "--data.num_workers", "0", "--data.store_root", str(tmp_path / "stores"),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--run_dir", str(tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.csv").is_file()


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint(tmp_path):
    common = ["train.py", "fit", "--config", "configs/sd14/depth.yaml", "--data.diffusion", "configs/diffusion/tiny.yaml",
              "--data.generation.height", "128", "--data.generation.width", "128", "--data.labels", "{depth: {name: vertical}}",
              "--data.prompts.source", "data/prompts/demo.txt", "--data.prompts.limit", "2", "--data.num_workers", "0",
              "--data.store_root", str(tmp_path / "stores"), "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    cli(*common, "--trainer.max_epochs", "1", "--run_dir", str(tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"  # the sd14 trainer config keeps the last epoch
    assert last.is_file()
    proc = cli(*common, "--trainer.max_epochs", "2", "--run_dir", str(tmp_path / "b"), "--ckpt_path", str(last))
    assert "Restored all states" in proc.stdout + proc.stderr
    assert (tmp_path / "b" / "metrics.csv").is_file()


@pytest.mark.slow
def test_csv_logger_instead_of_wandb(tmp_path):
    cli("train.py", "fit", "--config", "configs/tiny_streaming.yaml", "--trainer.logger", "configs/logger/csv.yaml",
        "--data.prompts.limit", "3", "--data.store_root", str(tmp_path / "stores"), "--run_dir", str(tmp_path / "run"),
        env_extra={"WANDB_MODE": "disabled"})
    assert (tmp_path / "run" / "report.html").is_file() and not (tmp_path / "run" / "wandb").exists()
    assert list((tmp_path / "run").rglob("metrics.csv"))


@pytest.mark.slow
def test_sd14_config_without_weights_fails_with_instructions(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/sd14/foreground.yaml",
                           "--data.prompts.source", "data/prompts/demo.txt", "--data.store_root", str(tmp_path),
                           "--trainer.accelerator", "cpu", "--run_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "SD weights CompVis/stable-diffusion-v1-4" in proc.stderr and "Traceback" not in proc.stderr  # pre-flight
    assert "hf download CompVis/stable-diffusion-v1-4" in proc.stderr
