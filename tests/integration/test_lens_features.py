"""The U-Net side of the semantic lens: the extended layer registry, real-image features, the
object embeddings cache, the toy world as a dataset, and the scoring of variants and videos."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probes.diffusion.layers import (
    ALL_KINDS,
    SD14_LAYERS,
    LayerInfo,
    LayerRegistry,
    check_layer_patterns,
    first_at_grid,
    kind_of,
)
from probes.experiments.lens.datasets.toy import ToyVideos, ToyWorld, class_table, video_frame
from probes.experiments.lens.embeddings import (
    EmbeddingCache,
    ObjectEmbeddings,
    PoolingSpec,
    cache_request,
    request_fingerprint,
)
from probes.experiments.lens.experiments import (
    auto_combinations,
    control_gap,
    distinct_layers,
    paired_rows,
    semantic_rows,
    value_of,
    video_rows,
)
from probes.experiments.lens.features import FeatureExtractor, FeatureSpec, denoise_schedule, noise_for
from probes.experiments.lens.pooling import IGNORE_ID, pool_instances
from probes.toy.world import SHIPPED_WORLD, scene_for

# -- the registry -------------------------------------------------------------------------------


def test_default_registry_is_unchanged(tiny_pipe):
    reg = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16))
    assert reg.names() == list(SD14_LAYERS)
    assert all(l.kind == "attn1" for l in reg)


def test_full_registry_names_order_and_kinds(tiny_pipe):
    reg = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16), kinds=ALL_KINDS)
    names = reg.names()
    assert names[:8] == ["down0.res0", "down0.0", "down0.attn0", "down0.res1", "down0.1", "down0.attn1",
                         "down0.downsample", "down0.out"]
    assert [n for n in names if n.startswith("mid")] == ["mid.res0", "mid.0", "mid.attn0", "mid.res1", "mid.out"]
    assert "down3.downsample" not in names and "down3.out" in names and "up3.upsample" not in names
    assert [n for n in names if kind_of(n) == "attn1"] == list(SD14_LAYERS)   # every old name, same order
    assert reg.get("down0.attn0").module == "down_blocks.0.attentions.0"
    assert reg.get("up1.upsample").module == "up_blocks.1.upsamplers.0"
    assert reg.get("mid.out").module == "mid_block"
    assert {kind_of(n) for n in names} == set(ALL_KINDS)
    assert reg.get("down0.downsample").grid == (8, 8) and reg.get("up1.upsample").grid == (8, 8)
    assert reg.list("down0.res*") == ["down0.res0", "down0.res1"]
    assert [l.name for l in reg.select(["mid.*"])] == ["mid.res0", "mid.0", "mid.attn0", "mid.res1", "mid.out"]
    only_res = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16), kinds=["res"])
    assert all(n.split(".")[1].startswith("res") for n in only_res.names())
    with pytest.raises(ValueError, match="unknown layer kinds \\['resnet'\\]"):
        LayerRegistry.from_unet(tiny_pipe.unet, (16, 16), kinds=["resnet"])


def test_registry_channels_and_grids_match_the_hooked_outputs(tiny_pipe):
    """Every registered layer's (channels, grid) is what its hook really sees in a forward pass."""
    from probes.experiments.lens.features import as_feature_map

    reg = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16), kinds=ALL_KINDS)
    seen: dict[str, tuple] = {}
    handles = []
    for info in reg:
        def hook(module, args, out, info=info):
            seen[info.name] = tuple(as_feature_map(out, info).shape)   # raises on a mismatch
        handles.append(tiny_pipe.unet.get_submodule(info.module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            tiny_pipe.unet(torch.randn(2, 4, 16, 16), 10, encoder_hidden_states=torch.randn(2, 77, 32))
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(reg.names())
    for info in reg:
        assert seen[info.name] == (2, info.channels, *info.grid), info.name


def test_first_encoder_layer_at_16x16_for_sd14_and_toy(tiny_pipe):
    """The docstring's mapping: SD v1.4 at 512 px has 16x16 in down_blocks.2; the toy-sized
    model (latent 16) is already 16x16 in down_blocks.0."""
    from diffusers import UNet2DConditionModel

    from probes.diffusion.loading import load_architecture

    with torch.device("meta"):
        sd = UNet2DConditionModel(**load_architecture("sd14")["unet"])
    reg = LayerRegistry.from_unet(sd, (64, 64), kinds=ALL_KINDS)
    assert first_at_grid(reg, (16, 16)) == {"first_output": "down1.downsample", "sampler": "down1.downsample",
                                            "out": "down1.out", "res": "down2.res0", "attn1": "down2.0",
                                            "attn": "down2.attn0"}
    assert reg.get("down2.res0").channels == 1280 and reg.get("down2.attn0").grid == (16, 16)
    tiny = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16), kinds=ALL_KINDS)
    assert first_at_grid(tiny, (16, 16)) == {"first_output": "down0.res0", "res": "down0.res0",
                                             "attn1": "down0.0", "attn": "down0.attn0"}
    assert tiny.at_grid((2, 2), kinds=["out"]) == ["down2.out", "down3.out", "mid.out"]


def test_layer_patterns_checked_at_config_time():
    check_layer_patterns(["down0.res0", "mid.out", "up1.upsample", "down*.attn*", "all"], kinds=ALL_KINDS)
    with pytest.raises(ValueError, match="features.layers: 'down0.rse0' names no layer"):
        check_layer_patterns(["down0.rse0"], kinds=ALL_KINDS, option="features.layers")
    with pytest.raises(ValueError, match="capture.layers: 'down0.res0'"):
        check_layer_patterns(["down0.res0"])           # the probes still take self-attentions only
    check_layer_patterns(["up3.0", "*attn1*"])          # old behaviour kept


# -- features -----------------------------------------------------------------------------------


def _images(n: int, size: int = 64) -> list[np.ndarray]:
    return list(ToyWorld(n, seed=5, size=size))


def test_features_shapes_resolutions_and_seeded_noise(tiny_pipe):
    spec = FeatureSpec(layers=["down0.res0", "down0.0", "down0.attn0", "down1.downsample", "mid.out", "up2.upsample"],
                       timestep=200, batch_size=2)
    ext = FeatureExtractor(tiny_pipe, spec)
    assert ext.size == 128 and ext.latent_hw == (16, 16)      # tiny: sample 16 x VAE 8; toy 64 px resized
    items = _images(3)
    feats = ext.extract([it["image"] for it in items], [it["id"] for it in items])
    for info in ext.layers:
        assert tuple(feats[info.name].shape) == (3, info.channels, *info.grid), info.name
        assert feats[info.name].dtype == torch.float32 and torch.isfinite(feats[info.name]).all()
    assert tuple(feats["down0.res0"].shape[2:]) == (16, 16) and tuple(feats["mid.out"].shape[2:]) == (2, 2)
    # noise is per key: one image alone gives what it gave inside a batch of three
    alone = ext.extract([items[1]["image"]], [items[1]["id"]])
    for name in feats:
        torch.testing.assert_close(alone[name][0], feats[name][1], rtol=1e-3, atol=5e-4)  # batch-size numerics
    other = ext.extract([items[1]["image"]], ["another key"])
    assert not torch.allclose(other["down0.res0"], alone["down0.res0"])
    assert noise_for(["a"], 0, (2, 2)).equal(noise_for(["a"], 0, (2, 2)))


def test_early_stop_and_token_layout_agree_with_a_full_pass(tiny_pipe):
    items = _images(2)
    images, keys = [it["image"] for it in items], [it["id"] for it in items]
    early = FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down0.0"])).extract(images, keys)
    full = FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down0.0", "up3.out"])).extract(images, keys)
    torch.testing.assert_close(early["down0.0"], full["down0.0"])
    # the self-attention's tokens [B, 256, C] become the [B, C, 16, 16] map token by token (row-major)
    ext = FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down0.0"]))
    captured = {}
    handle = tiny_pipe.unet.get_submodule(ext.layers[0].module).register_forward_hook(
        lambda m, a, out: captured.setdefault("tokens", out.detach().clone()))
    try:
        feats = ext.extract(images[:1], keys[:1])
    finally:
        handle.remove()
    tokens = captured["tokens"][0]                                   # [256, C]
    torch.testing.assert_close(feats["down0.0"][0][:, 3, 5], tokens[3 * 16 + 5])


def test_denoising_steps_change_features_and_zero_steps_is_direct_noising(tiny_pipe):
    items = _images(2)
    images, keys = [it["image"] for it in items], [it["id"] for it in items]
    base = FeatureSpec(layers=["down0.res0"], timestep=100)
    direct = FeatureExtractor(tiny_pipe, base).extract(images, keys)["down0.res0"]
    zero = FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down0.res0"], timestep=100, denoise_steps=0,
                                                   denoise_from=700)).extract(images, keys)["down0.res0"]
    torch.testing.assert_close(direct, zero)
    stepped = FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down0.res0"], timestep=100, denoise_steps=3,
                                                      denoise_from=400)).extract(images, keys)["down0.res0"]
    assert stepped.shape == direct.shape and not torch.allclose(stepped, direct)
    assert denoise_schedule(400, 100, 3) == [400, 300, 200, 100] and denoise_schedule(400, 100, 0) == [100]


def test_feature_spec_errors_name_the_value(tiny_pipe):
    with pytest.raises(ValueError, match="denoise_from \\(100\\) must be above features.timestep \\(100\\)"):
        FeatureSpec(timestep=100, denoise_steps=2, denoise_from=100)
    with pytest.raises(ValueError, match="timestep 1000 is beyond the scheduler's last training timestep 999"):
        FeatureExtractor(tiny_pipe, FeatureSpec(layers=["mid.out"], timestep=1000))
    with pytest.raises(ValueError, match="image_size=100 must be a multiple of 64"):
        FeatureExtractor(tiny_pipe, FeatureSpec(layers=["mid.out"], image_size=100))
    with pytest.raises(KeyError, match="'down9.res0' matches no layer"):
        FeatureExtractor(tiny_pipe, FeatureSpec(layers=["down9.res0"]))


# -- the toy world as a dataset -------------------------------------------------------------------


def test_toy_items_have_the_loader_format_and_exact_classes():
    ds = ToyWorld(6, seed=3, class_by="shape")
    item = ds[0]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
    assert item["instances"].shape == (64, 64) and item["instances"].dtype == np.int32
    scene = scene_for(3, 0, world=SHIPPED_WORLD)                    # the shipped model's world by default
    for k, c in item["classes"].items():
        assert class_table("shape")[c] == scene.objects[k - 1].shape
        assert (item["instances"] == k).sum() >= 16
    assert item["id"] == "toy-3-0" and len(ds) == 6 and ds.fingerprint()["seed"] == 3
    sc = ToyWorld(2, seed=3, class_by="shape_colour")[0]
    obj = scene.objects[next(iter(sc["classes"])) - 1]
    assert sc["class_names"][sc["classes"][next(iter(sc["classes"]))]] == f"{obj.colour} {obj.shape}"
    tiny = ToyWorld(1, seed=3, min_pixels=10_000)[0]                # every object below the threshold
    assert tiny["classes"] == {} and (tiny["instances"] == IGNORE_ID).any()
    with pytest.raises(ValueError, match="unknown class_by 'size'"):
        ToyWorld(2, class_by="size")
    v1 = ToyWorld(6, seed=3, world="v1")                              # V1 stays selectable
    assert v1.fingerprint() != ds.fingerprint() and not np.array_equal(v1[0]["image"], item["image"])
    for k, c in v1[0]["classes"].items():
        assert class_table("shape")[c] == scene_for(3, 0, world="v1").objects[k - 1].shape
    with pytest.raises(ValueError, match="unknown world"):
        ToyWorld(2, world="v3")


@pytest.mark.parametrize("motion,step", [("camera", 10.0), ("object", 0.15)])
def test_toy_video_frames_keep_instance_ids(motion, step):
    videos = ToyVideos(sequences=2, frames=4, motion=motion, step=step, seed=7)
    seq = videos.sequences[1]
    frames = list(videos.frames(seq))
    first = scene_for(7, 1, world=SHIPPED_WORLD)
    assert [f["frame"] for f in frames] == [0, 1, 2, 3] and all(f["sequence"] == seq for f in frames)
    for f in frames:
        for k, c in f["classes"].items():        # instance k is scene.objects[k - 1] in every frame
            assert class_table("shape")[c] == first.objects[k - 1].shape
    assert not np.array_equal(frames[0]["image"], frames[-1]["image"])
    moved = video_frame(first, 3, motion, step)
    if motion == "camera":
        assert moved.camera.azimuth == pytest.approx(first.camera.azimuth + 30.0) and moved.objects == first.objects
    else:
        assert moved.objects[0].x == pytest.approx(first.objects[0].x + 0.45)
        assert moved.objects[1:] == first.objects[1:] and moved.camera == first.camera
    assert len(list(videos)) == 8


# -- the embeddings cache -----------------------------------------------------------------------------


def _fake_extract(images, keys):
    """Deterministic 'features' from the pixels: 4 channels at 8x8 (colour means and a ramp)."""
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)[None]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8)[0]
        out.append(torch.cat([pooled, pooled.mean(0, keepdim=True) * 2]))
    stacked = torch.stack(out)
    return {"a": stacked, "b": stacked[:, :2] + 1.0}


def _request(ds, variant=None, max_objects=4):
    layers = [LayerInfo("a", "x", 4, (8, 8)), LayerInfo("b", "y", 2, (8, 8))]
    return cache_request({"model_id": "fake"}, layers, {"timestep": 1}, PoolingSpec(max_objects=max_objects),
                         ds.fingerprint(), variant, len(ds))


def test_cache_pools_like_pool_instances_and_keeps_the_largest(tmp_path):
    ds = ToyWorld(5, seed=11)
    cache = EmbeddingCache.open_or_create(tmp_path, _request(ds, max_objects=1))
    assert cache.fill(iter(ds), _fake_extract, batch_size=2, progress=False) == 5
    objs = cache.load()
    assert len(objs) == 5 and objs.vectors["a"].shape == (5, 4) and objs.vectors["b"].shape == (5, 2)
    for row in range(5):
        item = ds[int(objs.item[row])]
        areas = {k: int((item["instances"] == k).sum()) for k in item["classes"]}
        assert objs.instance[row] == max(areas, key=areas.get)                 # the largest object
        assert objs.label[row] == item["classes"][int(objs.instance[row])]
        expected = pool_instances(_fake_extract([item["image"]], ["k"])["a"][0], item["instances"], "area",
                                  [int(objs.instance[row])]).embeddings[0]
        np.testing.assert_allclose(objs.vectors["a"][row], expected, rtol=1e-5, atol=1e-6)
    record = json.loads((cache.root / "commits" / "0000000.json").read_text())
    assert record["id"] == "toy-11-0" and len(record["ids"]) == 1


def test_cache_resumes_after_a_crash_and_never_reads_half_items(tmp_path):
    ds = ToyWorld(6, seed=12)
    calls = []

    def crashing(images, keys):
        calls.append(list(keys))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return _fake_extract(images, keys)

    cache = EmbeddingCache.open_or_create(tmp_path, _request(ds))
    with pytest.raises(RuntimeError, match="killed"):
        cache.fill(iter(ds), crashing, batch_size=2, progress=False)
    assert sorted(cache.commits.done()) == [0, 1]                # the crashed batch left no marker
    assert set(cache.load().item.tolist()) <= {0, 1}
    reopened = EmbeddingCache.open_or_create(tmp_path, _request(ds))
    assert reopened.root == cache.root and reopened.missing() == [2, 3, 4, 5]
    computed = []
    reopened.fill(iter(ds), lambda im, k: (computed.extend(k), _fake_extract(im, k))[1], batch_size=2,
                  progress=False)
    assert computed == [ds[i]["id"] for i in (2, 3, 4, 5)]       # only what was missing
    clean = EmbeddingCache.open_or_create(tmp_path / "clean", _request(ds))
    clean.fill(iter(ds), _fake_extract, batch_size=3, progress=False)
    a, b = reopened.load(), clean.load()
    np.testing.assert_array_equal(a.key, b.key)
    np.testing.assert_allclose(a.vectors["a"], b.vectors["a"], rtol=1e-5, atol=1e-6)   # batches of 2 vs 3


def test_cache_manifest_is_written_last_and_names_the_settings(tmp_path):
    ds = ToyWorld(3, seed=13)
    req = _request(ds)
    fp = request_fingerprint(req)
    half = tmp_path / fp
    (half / "emb").mkdir(parents=True)
    (half / "emb" / "a.npy").write_bytes(b"garbage")             # a creation that crashed
    cache = EmbeddingCache.open_or_create(tmp_path, req)
    manifest = json.loads((cache.root / "manifest.json").read_text())
    assert manifest["fingerprint"] == fp and manifest["request"]["dataset"]["seed"] == 13
    assert [l["name"] for l in manifest["request"]["layers"]] == ["a", "b"]
    assert request_fingerprint(_request(ds, {"transform": "rotation", "strength": 30})) != fp
    assert request_fingerprint(_request(ToyWorld(3, seed=14))) != fp
    with pytest.raises(KeyError, match="layers \\['c'\\] are not in the cache"):
        cache.load(["c"])


def test_transformed_variant_keeps_object_keys(tmp_path):
    from probes.experiments.lens.transforms import hflip

    ds = ToyWorld(4, seed=15)
    ref = EmbeddingCache.open_or_create(tmp_path, _request(ds))
    ref.fill(iter(ds), _fake_extract, progress=False)
    var = EmbeddingCache.open_or_create(tmp_path, _request(ds, {"transform": "hflip", "strength": 1}))
    var.fill(iter(ds), _fake_extract, transform=lambda im, m: hflip(im, m, 1), progress=False)
    r, v = ref.load(), var.load()
    np.testing.assert_array_equal(np.sort(r.key), np.sort(v.key))
    # the fake features are flip-equivariant (pixel means on an 8x8 grid that divides 64 px), so
    # if mask and image were flipped together every object keeps its embedding exactly
    ro, vo = np.argsort(r.key), np.argsort(v.key)
    np.testing.assert_allclose(v.vectors["a"][vo], r.vectors["a"][ro], rtol=1e-5)
    assert not np.array_equal(ds[0]["image"], hflip(ds[0]["image"], ds[0]["instances"], 1)[0])


# -- scoring variants and videos ---------------------------------------------------------------------


def _objects(n_items: int, per_item: int, dim: int = 6, seed: int = 0, labels=None, **extra) -> ObjectEmbeddings:
    rng = np.random.default_rng(seed)
    m = n_items * per_item
    item = np.repeat(np.arange(n_items), per_item)
    inst = np.tile(np.arange(1, per_item + 1), n_items)
    label = np.asarray(labels if labels is not None else inst % 3)
    return ObjectEmbeddings(item, inst, label, extra.get("sequence", np.array([""] * m, dtype=object)),
                            extra.get("frame", np.full(m, -1)), {"l": rng.normal(size=(m, dim)),
                                                                 "k": rng.normal(size=(m, dim))})


def test_paired_rows_identity_and_vanished_objects():
    ref = _objects(5, 3)
    rows = paired_rows(ref, ref, ["l", "l+k"], ["cosine", "euclidean"], "m", "robustness", "rotation", 0)
    for layer in ("l", "l+k"):
        assert value_of(rows, layers=layer, distance="euclidean", metric="distance") == 0
        assert value_of(rows, layers=layer, distance="cosine", metric="instance_matching") == 1
        assert value_of(rows, layers=layer, distance="cosine", metric="instance_matching_chance") == pytest.approx(1 / 15)
    half = ref.select(np.arange(15) < 6)
    noisy = ObjectEmbeddings(half.item, half.instance, half.label, half.sequence, half.frame,
                             {k: v + 10.0 for k, v in half.vectors.items()})
    rows = paired_rows(ref, noisy, ["l"], ["euclidean"], "m", "robustness", "crop", 0.5)
    assert value_of(rows, metric="kept_fraction") == pytest.approx(6 / 15)
    assert value_of(rows, metric="distance") == pytest.approx(np.sqrt(6 * 100), rel=1e-5)
    assert 0 <= value_of(rows, metric="class_retrieval") <= 1


def test_video_rows_match_identical_objects_across_frames():
    seqs, frames, per = 3, 4, 2
    m = seqs * frames * per
    sequence = np.array([f"s{s}" for s in range(seqs) for _ in range(frames * per)], dtype=object)
    frame = np.tile(np.repeat(np.arange(frames), per), seqs)
    inst = np.tile(np.arange(1, per + 1), seqs * frames)
    rng = np.random.default_rng(0)
    base = {(s, k): rng.normal(size=5) for s in range(seqs) for k in range(1, per + 1)}
    vec = np.stack([base[(int(sequence[i][1:]), int(inst[i]))] + 0.01 * frame[i] for i in range(m)])
    objs = ObjectEmbeddings(np.arange(m) // per, inst, np.full(m, -1), sequence, frame, {"l": vec})
    rows = video_rows(objs, ["l"], ["euclidean"], "m")
    assert sorted({r["level"] for r in rows}) == [1.0, 2.0, 3.0]
    for gap in (1, 2, 3):
        assert value_of(rows, level=gap, metric="instance_matching") == 1.0
        assert value_of(rows, level=gap, metric="instance_matching_chance") == pytest.approx(1 / per)
        assert value_of(rows, level=gap, metric="instance_matching_all") == 1.0
        assert value_of(rows, level=gap, metric="distance") == pytest.approx(0.01 * gap * np.sqrt(5), rel=1e-5)
    with pytest.raises(ValueError, match="needs objects with a sequence"):
        video_rows(_objects(2, 2), ["l"], ["cosine"], "m")


def test_ranking_helpers_and_control_gap():
    objs = _objects(10, 3, labels=np.tile([0, 1, 2], 10))
    objs.vectors["l"][:, 0] += 5 * objs.label                 # 'l' separates the classes, 'k' does not
    objs.vectors["dup"] = objs.vectors["l"].copy()
    assert distinct_layers(objs, ["l", "dup", "k"]) == ["l", "k"]
    assert auto_combinations(["a", "b", "c", "d"], 3) == ["a+b", "a+c", "b+c", "a+b+c"]
    rows = semantic_rows(objs, ["l", "k"], ["cosine", "euclidean"], model="model")
    control = semantic_rows(objs.select(np.arange(30)), ["k", "l"], ["euclidean"], model="control")
    for r in control:                                          # pretend the control's 'l' is its 'k'
        r["layers"] = {"k": "l", "l": "k"}[r["layers"]]
    gap = control_gap(rows + control, "euclidean")
    assert gap["layer"] == "l" and gap["model_knn"] >= 0.8 and gap["gap"] > 0.3
    assert gap["chance"] == pytest.approx(1 / 3)
