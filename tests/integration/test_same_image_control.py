"""The same-image controls: a permuted (or freshly initialised) U-Net replayed on the trained model's recorded
trajectory sees exactly the model's inputs (checked by hash), shares its images and labels, and computes
other activations; the store's fingerprint is unchanged when nothing is recorded."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec
from probes.replay import run as replay_run
from probes.replay.run import ReplaySpec
from probes.replay.trajectory import StoreTrajectory
from probes.store import fill
from probes.store.manifest import store_request
from probes.training.datamodule import ActivationDataModule

STEPS, BATCH = 3, 4


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class InputHashes:
    """A forward pre-hook on a U-Net: per call, the hash of each conditional row's (x_t, t, text embedding)."""

    def __init__(self, unet: torch.nn.Module, cfg_batch: bool) -> None:
        self.calls: list[list[str]] = []
        self.cfg = cfg_batch
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x, t, emb = args[0], args[1], kwargs["encoder_hidden_states"]
        if self.cfg:                       # [uncond, cond]: the conditional half
            x, emb = x[x.shape[0] // 2:], emb[emb.shape[0] // 2:]
        t = torch.as_tensor(t).reshape(-1)[:1]
        self.calls.append([digest(x[b], t, emb[b]) for b in range(x.shape[0])])


def per_image(calls: list[list[str]], order: list[int]) -> dict[tuple[int, int], str]:
    """(store index, step) -> hash, for calls made chunk by chunk (BATCH images) and step by step."""
    out, k = {}, 0
    for c in range(0, len(order), BATCH):
        chunk = order[c:c + BATCH]
        for step in range(STEPS):
            for b, i in enumerate(chunk):
                out[(i, step)] = calls[k][b]
            k += 1
    assert k == len(calls)
    return out


def datamodule(tmp_path, prompts_file, replay=None, record=True) -> ActivationDataModule:
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny"),
        prompts=PromptSpec(source=str(prompts_file), val_fraction=0.2, test_fraction=0.25),
        generation=GenerationSpec(steps=STEPS, batch_size=BATCH, height=64, width=64),
        capture=CaptureSpec(layers=["mid*", "up3.0"], record_inputs=record),
        labels={"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}},
        store_root=str(tmp_path / "stores"), batch_size=BATCH, device="cpu", progress=False, replay=replay)


@pytest.mark.parametrize("weights", ["permuted", "random"])
def test_the_replayed_unet_sees_exactly_the_models_inputs(tmp_path, prompts_file, monkeypatch, weights):
    seen: dict[str, InputHashes] = {}
    real_load, real_replay = fill.load_pipeline, replay_run.replay_pipeline

    def load_and_watch(spec, device):
        pipe = real_load(spec, device)
        seen["model"] = InputHashes(pipe.unet, cfg_batch=True)
        return pipe

    def replay_and_watch(spec, diffusion, device):
        pipe = real_replay(spec, diffusion, device)
        seen["control"] = InputHashes(pipe.unet, cfg_batch=False)
        return pipe

    monkeypatch.setattr(fill, "load_pipeline", load_and_watch)
    monkeypatch.setattr(replay_run, "replay_pipeline", replay_and_watch)
    model = datamodule(tmp_path, prompts_file)
    model.setup("fit")
    control = datamodule(tmp_path, prompts_file, ReplaySpec(weights=weights, seed=3))
    control.setup("fit")

    n = model.store.num_samples
    generated = per_image(seen["model"].calls, list(range(n)))
    replayed = per_image(seen["control"].calls, list(range(n)))
    assert len(generated) == n * STEPS and generated == replayed       # every image, every step, bit for bit

    # the same images and labels, other activations
    assert control.store.source.root == model.store.root
    assert np.array_equal(control.store.images.array(), model.store.images.array())
    for t in model.label_caches:
        assert control.label_caches[t].path == model.label_caches[t].path
    a = model.store.activation("up3.0", 0)
    b = control.store.activation("up3.0", 0)
    assert a.shape == b.shape and not np.allclose(a, b)
    assert control.probe_spec.model["replay_name"] == f"control_{weights}_same_images"


def test_a_trajectory_reads_back_in_the_dtypes_the_unet_received(tmp_path, prompts_file):
    dm = datamodule(tmp_path, prompts_file)
    dm.setup("fit")
    traj = StoreTrajectory(dm.store).batch([0, 1])
    assert traj.latents.shape == (2, STEPS, 4, 8, 8) and traj.latents.dtype == torch.float32
    assert traj.text.shape[:2] == (2, 2) and traj.timesteps.shape == (STEPS,)
    assert [float(t) for t in traj.timesteps] == dm.store.manifest["capture"]["timesteps"]


def test_replay_needs_a_recorded_trajectory_and_leaves_old_fingerprints_alone(tmp_path, prompts_file):
    with pytest.raises(ValueError, match="record_inputs: true"):
        datamodule(tmp_path, prompts_file, ReplaySpec(), record=False)
    with pytest.raises(ValueError, match="permuted.*random"):
        ReplaySpec(weights="shuffled")
    dm = datamodule(tmp_path, prompts_file, record=False)
    req = store_request(dm.diffusion, dm.generation, dm.capture, dm.records())
    assert "record_inputs" not in req["capture"]      # stores made before the option keep their folders
