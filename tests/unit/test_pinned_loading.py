"""Weights are loaded pinned and safely: no pickled code from a checkpoint, checked torchvision files, pinned SD.

Issue 18, "What the hostile tester found", item 4.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SD14 = "CompVis/stable-diffusion-v1-4"


def _ran(path: str) -> None:
    Path(path).write_text("a pickled object ran code")


class Payload:
    """What a tampered checkpoint holds: an object whose unpickling runs a function."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _ran, (self.marker,)


def test_a_toy_model_resume_checkpoint_never_runs_pickled_code(tmp_path):
    from probes.recipes.toy_model.checkpoint import run_loop

    marker, ckpt = tmp_path / "ran", tmp_path / "unet.pt"
    torch.save({"step": 1, "seconds": 0.0, "losses": [], "model": Payload(marker), "optimizer": {}, "ema": None}, ckpt)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=rf"(?s){ckpt.name} holds objects other than tensors.*delete it"):
        run_loop("t", ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1),
                 lambda g: model(torch.randn(4, 2, generator=g)).pow(2).mean(), steps=2, seed=0, lr=0.1, warmup=1,
                 ckpt_every=1)
    assert not marker.exists()


def test_a_toy_model_resume_checkpoint_of_its_own_still_resumes(tmp_path):
    from probes.recipes.toy_model.checkpoint import run_loop

    def loop(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        result, _ = run_loop("t", tmp_path / "c.pt", model, opt,
                             lambda g: model(torch.randn(4, 2, generator=g)).pow(2).mean(),
                             steps=steps, seed=0, lr=0.1, warmup=1, ckpt_every=1, ema_decay=0.9)
        return result, model

    first, _ = loop(2)
    second, model = loop(3)                     # resumed from the checkpoint written with weights_only-loadable data
    assert first.steps == 2 and second.steps == 3 and len(second.losses) == 3


def test_a_toy_labeler_resume_checkpoint_never_runs_pickled_code(tmp_path):
    from probes.recipes.toy_labelers import train as recipe

    tiny = recipe.Recipe(seed=3, scenes=8, dense_steps=4, classifier_steps=2, batch=4, checkpoint_every=2, threads=1)
    marker = tmp_path / "ran"
    (tmp_path / "out" / ".checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "out" / ".checkpoints" / "dense.pt"
    torch.save({"recipe": Payload(marker), "step": 1}, ckpt)
    with pytest.raises(ValueError, match=r"dense\.pt holds objects other than tensors"):
        recipe.train_net("dense", recipe.render_training_set(tiny), tiny, tmp_path / "out")
    assert not marker.exists()


def test_a_cached_torchvision_checkpoint_must_match_the_hash_in_its_name(tmp_path):
    from torchvision.models import get_model, get_model_weights

    from probes.experiments.classify.models import load_classifier

    w = get_model_weights("squeezenet1_1").DEFAULT
    path = tmp_path / "checkpoints" / Path(w.url).name              # squeezenet1_1-b8a52dc0.pth
    path.parent.mkdir()
    torch.save(get_model("squeezenet1_1", weights=None).state_dict(), path)   # loadable, but not the published weights
    with pytest.raises(ValueError, match=rf"(?s){path.name} has sha256 .* its name says it starts with b8a52dc0"):
        load_classifier("torchvision:squeezenet1_1", cache_dir=str(tmp_path))


def test_stable_diffusion_is_pinned_to_a_commit_by_default_and_overridable():
    from probes.diffusion.loading import PINNED_REVISIONS, DiffusionSpec

    pinned = PINNED_REVISIONS[SD14]
    assert len(pinned) == 40 and all(c in "0123456789abcdef" for c in pinned)
    assert DiffusionSpec().revision == pinned and DiffusionSpec().identity()["revision"] == pinned
    assert DiffusionSpec(revision="main").revision == "main"
    assert DiffusionSpec(model_id="someone/other-model").revision is None     # no pin known: the hub's main
    assert DiffusionSpec(source="random", architecture="tiny").revision is None
    text = (Path(__file__).resolve().parents[2] / "configs" / "diffusion" / "sd14.yaml").read_text()
    assert f"revision: {pinned}" in text


def test_the_missing_weights_advice_downloads_the_pinned_commit():
    from probes.cli.preflight import diffusion_prerequisites
    from probes.diffusion.loading import PINNED_REVISIONS, DiffusionSpec

    missing = diffusion_prerequisites(DiffusionSpec(cache_dir="/nonexistent/hf"))
    assert missing and f"--revision {PINNED_REVISIONS[SD14]}" in missing[0].fix
