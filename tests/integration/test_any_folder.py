"""The project's own data (the toy model, its labelers, the prompt sets) is found from any working
folder; a user's paths stay relative to where the user is."""
from __future__ import annotations

from pathlib import Path

import pytest

from probes.cli.preflight import PreflightFailed, diffusion_prerequisites
from probes.cli.train import train_main
from probes.diffusion.loading import DiffusionSpec, local_model_dir
from probes.paths import data_path, shipped_or_local
from probes.prompts.sets import resolve_source
from tests.conftest import REPO


def test_shipped_data_resolves_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_model_dir("data/toy/model") == data_path("toy", "model")
    assert resolve_source("data/prompts/demo.txt") == data_path("prompts", "demo.txt")
    spec = DiffusionSpec(source="hub", model_id="data/toy/model", local_files_only=True, precision="fp32")
    assert diffusion_prerequisites(spec) == []


def test_a_users_own_file_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "demo.txt").write_text("a red cube\n")
    assert resolve_source("data/prompts/demo.txt").resolve() == tmp_path / "data" / "prompts" / "demo.txt"
    assert shipped_or_local("data/absent.txt") == Path("data/absent.txt")     # named as given, in the error


def test_toy_demo_config_reaches_the_preflight_from_another_folder(tmp_path, monkeypatch):
    """``fit --config /abs/configs/toy/demo.yaml`` from elsewhere: the model, labelers and prompts are
    found, so the pre-flight speaks, and names only the one thing this command line breaks: the user's
    prompt file, looked for where the user is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(PreflightFailed) as failed:
        train_main(["fit", "--config", str(REPO / "configs" / "toy" / "demo.yaml"), "--data.prompts.source", "my_prompts.txt",
                    "--data.store_root", str(tmp_path / "stores"), "--run_dir", str(tmp_path / "run")])
    message = str(failed.value.code)
    assert "1 prerequisite is missing" in message and "my_prompts.txt" in message, message
    assert not (tmp_path / "run").exists()
