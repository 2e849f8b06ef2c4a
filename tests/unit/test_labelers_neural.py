"""MiDaS (DPT) and Intrinsic labelers, offline: tiny random-weight DPT, fake ``intrinsic`` package."""
from __future__ import annotations

import os
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no network retries

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.labels import build_labeler, list_labelers
from probes.labels.intrinsic import INSTALL_CMD, IntrinsicLabeler, IntrinsicNotInstalledError, uninvert
from probes.labels.midas import MidasLabeler, MissingWeightsError, midas_input_size, midas_postprocess, midas_preprocess


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images: closer to photographs than white noise for resampling checks."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in small])


@pytest.fixture(scope="module")
def tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 64],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    return DPTForDepthEstimation(config).eval()


# ----------------------------------------------------------------------------------------------- MiDaS
def test_registered_and_lazy():
    assert {"midas", "intrinsic"} <= set(list_labelers())
    midas = build_labeler("midas")
    assert isinstance(midas, MidasLabeler) and midas.model is None  # building never loads weights
    assert isinstance(build_labeler("intrinsic"), IntrinsicLabeler)


def test_fingerprint_ignores_runtime_options_and_spelled_out_defaults():
    base = build_labeler("midas").fingerprint()
    assert build_labeler("midas", model_id="Intel/dpt-large", dtype="float32", batch_size=2, device="cuda",
                         cache_dir="/x", local_files_only=True).fingerprint() == base
    assert build_labeler("midas", dtype="float16").fingerprint() != base
    assert MidasLabeler.from_model(object()).fingerprint() != base
    ib = build_labeler("intrinsic").fingerprint()
    assert build_labeler("intrinsic", weights="paper_weights", resize_conf=0.0, seed=0).fingerprint() == ib
    assert build_labeler("intrinsic", seed=1).fingerprint() != ib


def test_bad_dtype_named():
    with pytest.raises(ValueError, match="bfloat16"):
        MidasLabeler(dtype="bfloat16")


@pytest.mark.parametrize("hw, expected", [((512, 512), (384, 384)), ((64, 64), (384, 384)),
                                          ((512, 768), (384, 576)), ((1024, 600), (640, 384))])
def test_input_size_follows_midas_minimal_rule(hw, expected):
    assert midas_input_size(*hw) == expected


def test_preprocess_matches_hand_computation():
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = midas_preprocess(images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 384, 384)
    for i in range(2):
        resized = cv2.resize(images[i].astype(np.float64), (384, 384), interpolation=cv2.INTER_CUBIC)
        hand = (resized / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(x[i].numpy(), hand.transpose(2, 0, 1), atol=1e-6)
    # bicubic overshoot is kept (MiDaS does not clip), so noise can leave [-1, 1] slightly
    assert x.min() < -1 or x.max() > 1


def test_preprocess_downscale_512_and_single_image():
    image = _smooth_images(1, 512)[0]
    x = midas_preprocess(image)
    hand = (cv2.resize(image.astype(np.float64) / 255.0, (384, 384), interpolation=cv2.INTER_CUBIC) - 0.5) / 0.5
    assert tuple(x.shape) == (1, 3, 384, 384)
    np.testing.assert_allclose(x[0].numpy(), hand.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_close_to_transformers_image_processor():
    """DPTImageProcessor resamples with torchvision, not OpenCV: close, not equal (why we do it ourselves)."""
    from transformers import DPTImageProcessor

    image = _smooth_images(1, 64)[0]
    proc = DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             keep_aspect_ratio=True, ensure_multiple_of=32, resample=3)
    ref = proc(images=image, return_tensors="pt").pixel_values
    ours = midas_preprocess(image)
    assert ref.shape == ours.shape
    diff = (ref - ours).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.06


def test_preprocess_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        midas_preprocess(np.zeros((1, 64, 64, 3), dtype=np.float32))


def test_postprocess_is_bicubic_align_corners_false():
    pred = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0)) * 10
    out = midas_postprocess(pred, (16, 16))
    assert out.dtype == np.float32 and out.shape == (2, 16, 16)
    bicubic = F.interpolate(pred[:, None], size=(16, 16), mode="bicubic", align_corners=False)[:, 0]
    np.testing.assert_allclose(out, bicubic.numpy(), atol=1e-6)
    bilinear = F.interpolate(pred[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert np.abs(out - bilinear.numpy()).max() > 1e-3


def test_tiny_dpt_end_to_end(tiny_dpt):
    images = _smooth_images(3, 64)
    labeler = MidasLabeler.from_model(tiny_dpt, batch_size=2)
    labeler.load("cpu")
    out = labeler(images)
    assert out.dtype == np.float32 and out.shape == (3, 64, 64) and np.isfinite(out).all()
    with torch.no_grad():
        pred = tiny_dpt(pixel_values=midas_preprocess(images)).predicted_depth
    assert tuple(pred.shape) == (3, 384, 384)
    expected = F.interpolate(pred[:, None], size=(64, 64), mode="bicubic", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # batching does not change the labels
    np.testing.assert_allclose(MidasLabeler.from_model(tiny_dpt, batch_size=3)(images), out, rtol=1e-4, atol=1e-4)


def test_tiny_dpt_128_and_non_square_error(tiny_dpt):
    labeler = MidasLabeler.from_model(tiny_dpt)
    out = labeler(_smooth_images(1, 128))
    assert out.shape == (1, 128, 128) and out.dtype == np.float32
    with pytest.raises(ValueError, match="square"):
        labeler(np.zeros((1, 64, 96, 3), dtype=np.uint8))


def test_missing_weights_error_names_model_cache_and_command(tmp_path):
    model_id = "certainly-not-a-user/dpt-never-cached-0123456789"
    labeler = MidasLabeler(model_id=model_id, local_files_only=True, cache_dir=str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        labeler.load("cpu")
    msg = str(info.value)
    assert model_id in msg and str(tmp_path) in msg
    assert f"hf download {model_id}" in msg and "huggingface-cli" not in msg  # the installed hub client has only `hf`
    assert "local_files_only=True" in msg


def test_hf_hub_offline_forces_local_files_only(monkeypatch):
    from transformers import DPTForDepthEstimation

    seen = {}

    def fake_from_pretrained(model_id, **kwargs):
        seen.update(kwargs, model_id=model_id)
        raise OSError("not cached")

    monkeypatch.setattr(DPTForDepthEstimation, "from_pretrained", fake_from_pretrained)
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
        MidasLabeler(revision="abc123").load("cpu")
    assert seen["model_id"] == "Intel/dpt-large" and seen["local_files_only"] is True
    assert seen["revision"] == "abc123" and seen["dtype"] == torch.float32
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert MidasLabeler().local_files_only() is False


# ------------------------------------------------------------------------------------------- Intrinsic
def test_uninvert_maths():
    inv = np.array([0.5, 1.0, 0.0, -0.2, 2.0, 0.001, 0.25], dtype=np.float32)
    out = uninvert(inv)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [1.0, 0.0, 999.0, 999.0, 0.0, 999.0, 3.0], rtol=1e-5)
    np.testing.assert_allclose(uninvert(np.array([0.0]), eps=0.01), [99.0], rtol=1e-5)


def _fake_intrinsic(monkeypatch, inv: np.ndarray, api: str = "current") -> list[dict]:
    """Install a fake ``intrinsic`` package that records each call and returns ``inv``."""
    calls: list[dict] = []
    pkg = types.ModuleType("intrinsic")
    pipeline = types.ModuleType("intrinsic.pipeline")

    def load_models(path, **kwargs):
        calls.append({"fn": "load_models", "path": path, **kwargs})
        return {"ord_model": "ord", "iid_model": "iid"}

    def run_pipeline(models, img_arr, **kwargs):
        calls.append({"fn": "run_pipeline", "models": models, "img": img_arr.copy(),
                      "np_draw": np.random.randn(), **kwargs})
        key = "gry_shd" if api == "current" else "inv_shading"
        return {key: inv.copy(), "image": img_arr}

    pipeline.run_pipeline = run_pipeline
    pkg.pipeline = pipeline
    monkeypatch.setitem(sys.modules, "intrinsic", pkg)
    monkeypatch.setitem(sys.modules, "intrinsic.pipeline", pipeline)
    if api == "current":
        pipeline.load_models = load_models
    else:
        model_util = types.ModuleType("intrinsic.model_util")
        model_util.load_models = load_models
        pkg.model_util = model_util
        monkeypatch.setitem(sys.modules, "intrinsic.model_util", model_util)
    return calls


def test_intrinsic_adapter_with_fake_package(monkeypatch):
    inv = np.random.default_rng(2).uniform(0.05, 0.95, (96, 96)).astype(np.float32)  # != input size
    calls = _fake_intrinsic(monkeypatch, inv)
    images = _smooth_images(2, 64)
    labeler = build_labeler("intrinsic")
    labeler.load("cpu")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    out = labeler(images)

    load_call, runs = calls[0], calls[1:]
    assert load_call["fn"] == "load_models" and load_call["path"] == "paper_weights"
    assert load_call["device"] == "cpu" and load_call["stage"] == 1
    assert len(runs) == 2
    for image, run in zip(images, runs):
        img = run["img"]
        assert run["stage"] == 1 and run["resize_conf"] == 0.0 and run["device"] == "cpu"
        assert img.dtype == np.float32 and img.shape == (64, 64, 3)
        assert 0.0 <= img.min() and img.max() <= 1.0
        np.testing.assert_allclose(img, image / 255.0, atol=1e-6)
        assert run["models"] == {"ord_model": "ord", "iid_model": "iid"}
    # NumPy is seeded before every image (same draw), and the caller's RNG state is left alone
    assert runs[0]["np_draw"] == runs[1]["np_draw"]
    np.random.seed(0)
    assert runs[0]["np_draw"] == np.random.randn()
    np.random.seed(123)
    assert (np.random.get_state()[1] == before).all()

    expected = cv2.resize(uninvert(inv), (64, 64), interpolation=cv2.INTER_LINEAR)
    assert out.dtype == np.float32 and out.shape == (2, 64, 64)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[1], expected, rtol=1e-6)


def test_intrinsic_same_size_output_not_resized_and_kwargs_passed(monkeypatch):
    inv = np.random.default_rng(3).uniform(0.05, 0.95, (64, 64, 1)).astype(np.float32)
    calls = _fake_intrinsic(monkeypatch, inv)
    out = build_labeler("intrinsic", resize_conf=None, device="cpu", seed=5)(_smooth_images(1, 64))
    assert calls[1]["resize_conf"] is None
    np.testing.assert_allclose(out[0], uninvert(inv[..., 0]), rtol=1e-6)


def test_intrinsic_v1_api(monkeypatch):
    inv = np.full((32, 32), 0.5, dtype=np.float32)
    calls = _fake_intrinsic(monkeypatch, inv, api="v1")
    labeler = build_labeler("intrinsic")
    out = labeler(_smooth_images(1, 64))
    assert labeler.api == "v1" and "stage" not in calls[1]
    np.testing.assert_allclose(out, np.ones((1, 64, 64)), atol=1e-6)


def test_intrinsic_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "intrinsic", None)  # makes `import intrinsic` fail
    with pytest.raises(IntrinsicNotInstalledError) as info:
        build_labeler("intrinsic").load("cpu")
    msg = str(info.value)
    assert INSTALL_CMD in msg and "main.zip" not in msg  # a pinned commit archive, not the moving branch
    assert "pip install https://github.com/compphoto/Intrinsic/archive/f70db32ef2d2842cd7a0779590a388154aee26de.zip" in msg
    assert "altered_midas" in msg and "chrislib" in msg
    assert "academic" in msg and "LICENSE" in msg
