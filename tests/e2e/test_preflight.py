"""Offline prerequisites, all at once (issue 9): the sd14 config offline used to fail first on the
prompt download with a 40-line socket traceback and only on a rerun reveal the missing weights.
The pre-flight check lists everything missing in one short message, with the exact config key or
command for each, exits non-zero without a traceback and leaves no run folder behind."""
from __future__ import annotations

import json

import pytest

from probes.cli.preflight import Missing, check_prerequisites
from probes.labels import build_labeler
from tests.e2e.test_cli import run_inprocess


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "DPROBE_CACHE": str(tmp_path / "dprobe")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_CACHE", "DPROBE_CHEN2023_DIR", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    return env


def test_offline_sd14_lists_every_missing_prerequisite_at_once(tmp_path, empty_caches, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        run_inprocess("fit", "--config", "configs/sd14/all.yaml", "--run_dir", str(run),
                      "--data.store_root", str(tmp_path / "stores"), "--trainer.accelerator", "cpu",
                      env_extra=empty_caches)
    assert done.value.code not in (0, None)
    msg = str(done.value.code)
    for needle in ("data.prompts.local_dir", "hf download CompVis/stable-diffusion-v1-4", "TRACER",
                   "TRACER-Efficient-5.pth", "data.labels.foreground.checkpoint", "hf download Intel/dpt-large",
                   "Intrinsic"):
        assert needle in msg, (needle, msg)
    assert "huggingface-cli" not in msg and "Traceback" not in msg and " prompts.local_dir" not in msg
    assert len(msg.splitlines()) <= 25, msg
    assert not run.exists(), "a failed run must not leave an (empty) run folder behind"
    assert not (tmp_path / "stores").exists()


def test_run_dir_is_not_created_when_the_config_is_refused(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="data.batch_size"):
        run_inprocess("fit", "--config", "configs/tiny.yaml", "--run_dir", str(run), "--data.batch_size", "0",
                      "--data.store_root", str(tmp_path / "stores"))
    assert not run.exists()


def test_no_validation_split_is_reported_before_compute_when_the_model_selects(tmp_path):
    """Selecting each head's best epoch needs a val split (without selection, see test_no_validation)."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        run_inprocess("fit", "--config", "configs/tiny.yaml", "--run_dir", str(run), "--data.prompts.val_fraction",
                      "0", "--data.store_root", str(tmp_path / "stores"), "--model.init_args.selection", "best_val")
    assert "data.prompts.val_fraction" in str(done.value.code)
    assert not run.exists() and not (tmp_path / "stores").exists()


def test_labelers_report_what_they_lack_and_nothing_when_present(tmp_path, empty_caches):
    tracer = build_labeler("tracer")
    (missing,) = tracer.prerequisites("data.labels.foreground")
    assert isinstance(missing, Missing) and "TRACER-Efficient-5.pth" in missing.fix
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "TRACER-Efficient-5.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert tracer.prerequisites("data.labels.foreground") == []
    assert build_labeler("tracer", checkpoint=str(tmp_path / "nope.pth")).prerequisites("data.labels.fg")

    midas = build_labeler("midas")
    (missing,) = midas.prerequisites("data.labels.depth")
    assert "hf download Intel/dpt-large" in missing.fix
    snap = tmp_path / "hf" / "hub" / "models--Intel--dpt-large" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({}))
    (snap / "model.safetensors").write_bytes(b"x")
    refs = tmp_path / "hf" / "hub" / "models--Intel--dpt-large" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    assert midas.prerequisites("data.labels.depth") == []

    assert build_labeler("otsu").prerequisites("data.labels.foreground") == []


def test_the_tiny_demo_passes_the_check(tmp_path):
    from probes.training.datamodule import ActivationDataModule
    from probes.training.module import ProbeModule

    dm = ActivationDataModule.from_config({
        "diffusion": {"source": "random", "architecture": "tiny"}, "prompts": {"source": "demo", "limit": 2},
        "generation": {"steps": 2}, "capture": {"layers": ["up3.0"]}, "labels": {"depth": {"name": "vertical"}},
        "store_root": str(tmp_path)})
    assert check_prerequisites(dm, ProbeModule(), "fit") == []


def test_missing_weights_of_a_decoded_images_labeler_are_listed_with_its_key(tmp_path, empty_caches):
    """A labeler named only for the decoded images (``data.decoded_labels``) is checked like the labels'."""
    with pytest.raises(SystemExit) as done:
        run_inprocess("fit", "--config", "configs/tiny.yaml", "--run_dir", str(tmp_path / "run"),
                      "--data.store_root", str(tmp_path / "stores"),
                      "--data.decoded_labels", '{foreground: {name: tracer}}', env_extra=empty_caches)
    msg = str(done.value.code)
    assert "data.decoded_labels.foreground" in msg and "TRACER" in msg, msg
    assert not (tmp_path / "run").exists()
