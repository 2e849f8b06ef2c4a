"""TRACER TE-5 re-implementation: checkpoint-key compatibility, reference test vector, labeler.

The compatibility data (authors' state-dict key list and outputs under deterministic weights)
live in ``../shared/reference/tracer``; tests that need it skip, saying so, when it is absent
(and fail with ``DPROBE_REQUIRE_REFERENCE=1``, as in CI).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.labels import build_labeler
from probes.labels.tracer import CHECKPOINT_URL, TracerLabeler, load_tracer_state_dict
from probes.labels.tracer_net import TracerTE5
from tests.conftest import reference_path

TOL = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ref_file(name: str) -> Path:
    return reference_path("tracer", name, what="TRACER's reference key list and test vector")


def rule_weights(state_dict: dict[str, torch.Tensor], rule: str) -> dict[str, torch.Tensor]:
    """Deterministic weights of the reference's rule "A" or "B" (README section 6)."""
    out = {}
    for k, t in state_dict.items():
        g = torch.Generator().manual_seed(int(hashlib.sha256(k.encode()).hexdigest()[:8], 16))
        if k.endswith("running_var"):
            out[k] = torch.ones_like(t)
        elif k.endswith("running_mean"):
            out[k] = torch.zeros_like(t)
        elif k.endswith("num_batches_tracked"):
            out[k] = t.clone()
        elif rule == "A":
            out[k] = torch.randn(t.shape, generator=g) * 0.02
        elif t.dim() >= 2:
            out[k] = torch.randn(t.shape, generator=g) / math.sqrt(t.numel() // t.shape[0])
        elif k.endswith(".weight"):
            out[k] = 1.0 + torch.randn(t.shape, generator=g) * 0.02
        else:
            out[k] = torch.randn(t.shape, generator=g) * 0.02
    return out


def reference_input() -> torch.Tensor:
    x01 = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x01 - mean) / std


@pytest.fixture(scope="module")
def net_b() -> TracerTE5:
    net = TracerTE5()
    net.load_state_dict(rule_weights(net.state_dict(), "B"), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Intermediate tensors recorded in the test vector, by our module path (None: the edge module's x + edge).
INTERMEDIATES = {"model._blocks.7": "model._blocks.7 output (before the edge module)",
                 "model.Frequency_Edge_Module1": "model.Frequency_Edge_Module1 (returned feature x1 = x + edge)",
                 "model._blocks.12": "model._blocks.12 output", "model._blocks.26": "model._blocks.26 output",
                 "model._blocks.38": "model._blocks.38 output", "rfb2": "rfb2", "rfb3": "rfb3", "rfb4": "rfb4",
                 "agg": "agg", "ObjectAttention2": "ObjectAttention2", "ObjectAttention1": "ObjectAttention1"}


def run_reference(net: TracerTE5) -> tuple[tuple, dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [net.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o))
        for name in INTERMEDIATES]
    try:
        with torch.no_grad():
            out = net(reference_input())
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def stats_error(t: torch.Tensor, expected: dict) -> float:
    assert list(t.shape) == expected["shape"]
    got = {"mean": t.mean(), "std": t.std(), "min": t.min(), "max": t.max()}
    return max(abs(got[k].item() - expected[k]) for k in got)


def check_against_vector(out: tuple, seen: dict[str, torch.Tensor], rule: str) -> float:
    vector = json.loads(ref_file("te5_test_vector.json").read_text())
    expected = vector["weight_rules"][rule]
    sal, edge, (ds0, ds1, ds2) = out
    errors = {}
    for name, t in (("saliency", sal), ("edge", edge), ("ds_map0", ds0), ("ds_map1", ds1), ("ds_map2", ds2)):
        errors[name] = stats_error(t, expected[name])
        if "values_at_yx" in expected[name]:
            vals = torch.stack([t[0, 0, y, x] for y, x in vector["pixel_positions_yx"]])
            errors[name] = max(errors[name], (vals - torch.tensor(expected[name]["values_at_yx"])).abs().max().item())
    for ours, theirs in INTERMEDIATES.items():
        errors[ours] = stats_error(seen[ours], expected["intermediates"][theirs])
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, f"rule {rule}: outputs differ from the test vector by more than {TOL}: {bad}"
    return max(errors.values())


# ----------------------------------------------------------------------------- (a) state-dict keys
def test_state_dict_matches_reference_keys() -> None:
    rows = [line.split("\t") for line in ref_file("te5_state_dict.tsv").read_text().splitlines()[1:]]
    expected = {k: (tuple(json.loads(shape)), dtype) for k, shape, dtype in rows}
    assert len(expected) == len(rows) == 1387
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in TracerTE5().state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(expected)) == [], "keys our model has but the checkpoint lacks"
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}, "shape/dtype mismatches"


def test_parameter_count(net_b: TracerTE5) -> None:
    assert sum(p.numel() for p in net_b.parameters()) == 31_303_954


# ----------------------------------------------------------------------------- (b) test vector
def test_input_recipe_matches_vector() -> None:
    vector = json.loads(ref_file("te5_test_vector.json").read_text())["input"]
    x01 = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x01.flatten()[:4], torch.tensor(vector["x01_first_values"]), atol=1e-6)
    assert torch.allclose(reference_input()[0, :, 0, 0], torch.tensor(vector["x_at_0_0"]), atol=1e-5)


def test_rule_b_reproduces_test_vector(net_b: TracerTE5, no_tf32) -> None:
    out, seen = run_reference(net_b)
    assert all(0 <= t.min() and t.max() <= 1 for t in (out[0], out[1], *out[2]))
    check_against_vector(out, seen, "B_fan_in_rule")


def test_rule_a_reproduces_test_vector(no_tf32) -> None:
    ref_file("te5_test_vector.json")
    net = TracerTE5()
    net.load_state_dict(rule_weights(net.state_dict(), "A"), strict=True)
    check_against_vector(*run_reference(net.eval()), "A_brief_rule")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(net_b: TracerTE5, no_tf32) -> None:
    x = reference_input()
    with torch.no_grad():
        cpu = net_b(x)[0]
        gpu = net_b.to("cuda")(x.cuda())[0].cpu()
    net_b.to("cpu")
    assert (gpu - cpu).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- (c) checkpoint format
def test_loads_dataparallel_prefixed_state_dict(net_b: TracerTE5) -> None:
    want = net_b.state_dict()
    net = load_tracer_state_dict(TracerTE5(), {f"module.{k}": v for k, v in want.items()})
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    broken = {f"module.{k}": v for k, v in want.items() if not k.endswith("agg.UAM.fc.weight")}
    with pytest.raises(RuntimeError, match="agg.UAM.fc.weight"):  # strict: nothing silently missing
        load_tracer_state_dict(TracerTE5(), broken)


# ----------------------------------------------------------------------------- (d) checkpoint resolution
def test_offline_error_names_url_and_target(tmp_path: Path) -> None:
    labeler = build_labeler("tracer", cache_dir=str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError) as err:
        labeler.load("cpu")
    assert CHECKPOINT_URL in str(err.value)
    assert str(tmp_path / "ckpt" / "TRACER-Efficient-5.pth") in str(err.value)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_offline_kwarg_without_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DPROBE_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="TRACER-Efficient-5.pth"):
        TracerLabeler(cache_dir=str(tmp_path), offline=True).load("cpu")


def test_cached_checkpoint_and_sha256(net_b: TracerTE5, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "TRACER-Efficient-5.pth"
    torch.save({f"module.{k}": v for k, v in net_b.state_dict().items()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with caplog.at_level("WARNING"):
        TracerLabeler(cache_dir=str(tmp_path)).load("cpu")  # found in the cache: no download while offline
    assert digest in caplog.text
    TracerLabeler(checkpoint=str(path), sha256=digest).load("cpu")
    with pytest.raises(ValueError) as err:
        TracerLabeler(checkpoint=str(path), sha256="0" * 64).load("cpu")
    assert digest in str(err.value) and "0" * 64 in str(err.value)


# ----------------------------------------------------------------------------- (e) labeler
def test_labeler_outputs(net_b: TracerTE5) -> None:
    labeler = TracerLabeler.from_state_dict(net_b.state_dict(), device="cpu")
    assert labeler.name == "tracer" and labeler.fingerprint() != build_labeler("tracer").fingerprint()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    labels = labeler(images)
    assert labels.dtype == np.float32 and labels.shape == (2, 64, 64)
    assert np.array_equal(labels, np.floor(labels)) and labels.min() >= 0 and labels.max() <= 255
    assert labels.max() > 0  # rule-B saliency is ~0.5, i.e. ~127
