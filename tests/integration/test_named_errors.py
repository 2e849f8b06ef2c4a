"""One error that names the file (and the fix) instead of a traceback from deep inside a library, or wrong advice.

Issue 18, "What the hostile tester found", item 3. (``report`` on a value "abc" or a truncated
``summary.json`` is in ``test_integrity.py``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from probes.export.probeset import META, WEIGHTS, load_probes
from tests.exports import small_export

KEY = "foreground/up3.0/step_01/weight"


def rewrite_weights(export: Path, change) -> None:
    """Replace the weights and record their new checksum, as a tampering (or buggy) exporter would."""
    import hashlib

    tensors = load_file(str(export / WEIGHTS))
    change(tensors)
    save_file(tensors, str(export / WEIGHTS))
    meta = json.loads((export / META).read_text())
    meta["weights_sha256"] = hashlib.sha256((export / WEIGHTS).read_bytes()).hexdigest()
    (export / META).write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({KEY: t[KEY][:-1]}), r"has shape \(31, 2\).*must be \(32, 2\)"),        # cut weights
    (lambda t: t.update({KEY: t[KEY].T.contiguous()}), r"has shape \(2, 32\) \(transposed\)"),
    (lambda t: t.update({KEY: t[KEY].to(torch.int32)}), r"is torch\.int32; probe tensors are floating point"),
    (lambda t: t.pop(KEY), r"has no tensor foreground/up3\.0/step_01/weight, which .*probes\.json lists"),
])
def test_damaged_weights_are_named_when_loaded(tmp_path, change, message):
    export = small_export(tmp_path / "e")
    rewrite_weights(export, change)
    with pytest.raises(ValueError, match=rf"(?s)probes\.safetensors.*{message}"):
        load_probes(export)


def test_the_intervention_names_cut_weights_before_any_compute(tmp_path):
    from probes.experiments.intervention.config import InterventionConfig
    from probes.experiments.intervention.run import intervene

    export = small_export(tmp_path / "e")
    rewrite_weights(export, lambda t: t.update({KEY: t[KEY][:-1]}))
    with pytest.raises(ValueError, match=r"probes\.safetensors: foreground/up3\.0/step_01/weight has shape"):
        intervene(InterventionConfig(probes=str(export), out=str(tmp_path / "out"), progress=False))


def test_probe_metadata_without_probes_or_with_a_missing_key_is_named(tmp_path):
    export = small_export(tmp_path / "e")
    meta = json.loads((export / META).read_text())
    entries = meta.pop("probes")
    (export / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"probes\.json has no 'probes' list"):
        load_probes(export)
    del entries[0]["channels"]
    (export / META).write_text(json.dumps(dict(meta, probes=entries)))
    with pytest.raises(ValueError, match=r"probes\.json: probe entry .* lacks \['channels'\]"):
        load_probes(export)


def test_evaluate_on_non_finite_weights_never_advises_a_learning_rate(tmp_path):
    from probes.cli.evaluate import evaluate

    export = small_export(tmp_path / "e", weight=float("nan"))
    with pytest.raises(ValueError, match="not finite") as err:
        evaluate(str(export), out=str(tmp_path / "eval"), store_root=str(tmp_path / "stores"))
    assert "init_args.lr" not in str(err.value)
    assert not (tmp_path / "stores").exists()


def test_a_restored_module_that_diverges_says_the_export_not_the_learning_rate(tmp_path):
    from probes.export.rebuild import module_from_export
    from probes.training.finite import NonFiniteError

    module = module_from_export(small_export(tmp_path / "e"))
    batch = {"index": torch.tensor([0]), "acts": {"mid.0": torch.zeros(1, 3, 4, 64), "up3.0": torch.zeros(1, 3, 256, 32)},
             "labels": {"foreground": torch.zeros(1, 128, 128), "depth": torch.zeros(1, 128, 128)}}
    with pytest.raises(NonFiniteError) as err:
        module._non_finite("loss", "test", batch, [("depth", "up3.0", 1)])
    assert "read from an export" in str(err.value) and "init_args.lr" not in str(err.value)


# -- caches -------------------------------------------------------------------------------------
def test_a_deleted_label_array_is_named_with_its_fix(tmp_path, prompts_file):
    from probes.labels import build_labeler
    from probes.labels.cache import LabelCache
    from tests.integration.test_store_robustness import make

    store = make(tmp_path / "s", prompts_file)
    cache = LabelCache(store, "depth", build_labeler("vertical"))
    cache.ensure(range(4), progress=False)
    cache.path.unlink()
    again = LabelCache(store, "depth", build_labeler("vertical"))
    for call in (lambda: again.array(), lambda: again.ensure(range(4), progress=False) or again.array()):
        with pytest.raises(FileNotFoundError, match=r"(?s)labels\.npy is missing, but 4 commit markers.*deleted.*"
                                                    r"Delete the folder .* and rerun"):
            call()


def lens_cache(tmp: Path):
    import numpy as np

    from probes.diffusion.layers import LayerInfo
    from probes.experiments.lens.datasets.toy import ToyWorld
    from probes.experiments.lens.embeddings import EmbeddingCache, PoolingSpec, cache_request, dataset_fingerprint

    data = ToyWorld(n=2, size=32)
    request = cache_request({"model_id": "test"}, [LayerInfo("up3.0", "x", 4, (8, 8))], {}, PoolingSpec(max_objects=4),
                            dataset_fingerprint(data), None, len(data))
    cache = EmbeddingCache.open_or_create(tmp, request)
    cache.fill(iter(data), lambda images, keys: {"up3.0": np.ones((len(images), 4, 8, 8), np.float32)}, progress=False)
    return cache


def test_a_lens_cache_with_a_truncated_manifest_or_a_deleted_array_is_named(tmp_path):
    from probes.experiments.lens.embeddings import EmbeddingCache

    cache = lens_cache(tmp_path)
    manifest = cache.root / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=r"(?s)manifest\.json is not valid JSON.*delete the folder"):
        EmbeddingCache(cache.root)
    manifest.write_text(text)
    cache.arrays["up3.0"].path.unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)emb/up3\.0\.npy is missing.*delete the folder"):
        EmbeddingCache(cache.root)


# -- COCO ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    (lambda text, data: text[:len(text) // 2], r"not valid JSON .*truncated"),
    (lambda text, data: json.dumps([data]), r"a JSON list, where COCO has an object"),
    (lambda text, data: json.dumps(dict(data, annotations=[dict(data["annotations"][0], segmentation=[[1, 2, 3]])])),
     r"annotation 1 \(image 1\) has a malformed polygon segmentation"),
    (lambda text, data: json.dumps(dict(data, annotations=[dict(data["annotations"][0], segmentation={"x": 1})])),
     r"annotation 1 \(image 1\) has a malformed RLE segmentation"),
])
def test_a_damaged_coco_file_is_named(tmp_path, damage, message):
    from probes.experiments.lens.datasets import CocoInstances
    from tests.integration.test_safe_outputs import write_coco

    write_coco(tmp_path, "x.jpg")
    path = tmp_path / "annotations" / "instances_val2017.json"
    text = path.read_text()
    path.write_text(damage(text, json.loads(text)))
    with pytest.raises(ValueError, match=rf"instances_val2017\.json: {message}"):
        CocoInstances(tmp_path)


# -- plug-ins -----------------------------------------------------------------------------------
def test_a_plugin_that_raises_is_named(tmp_path):
    from probes.cli.plugins import PluginError, import_plugin

    plugin = tmp_path / "my_labeler.py"
    plugin.write_text("import math\nVALUE = math.sqrt(-1)\n")
    with pytest.raises(PluginError, match=rf"while importing plug-in {plugin}: ValueError: math domain error"):
        import_plugin(str(plugin))
    (tmp_path / "broken_pkg.py").write_text("raise RuntimeError('boom')\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(PluginError, match="while importing plug-in broken_pkg: RuntimeError: boom"):
            import_plugin("broken_pkg")
    finally:
        sys.path.remove(str(tmp_path))


def test_temporaries_a_killed_writer_left_in_label_and_lens_caches_are_swept(tmp_path, prompts_file):
    import os
    import time

    from probes.labels import build_labeler
    from probes.labels.cache import LabelCache
    from probes.store.activations import ActivationStore
    from tests.integration.test_store_robustness import make

    store = make(tmp_path / "s", prompts_file)
    cache = LabelCache(store, "depth", build_labeler("vertical"))
    cache.ensure(range(4), progress=False)
    past = time.time() - 3600
    left = [cache.root / "commits" / "0000001.json.tmpk9", tmp_path / "lens" / "x"]
    left[0].write_text("{")
    lens = lens_cache(tmp_path / "lens")
    left[1] = lens.root / "commits" / "0000000.json.tmpq1"
    left[1].write_text("{")
    for p in left:
        os.utime(p, (past, past))
    make(tmp_path / "s", prompts_file)                        # the next run on the store
    from probes.experiments.lens.embeddings import EmbeddingCache

    EmbeddingCache.open_or_create(tmp_path / "lens", lens.manifest["request"])   # the next lens run
    assert not left[0].exists() and not left[1].exists()
    assert ActivationStore(tmp_path / "s").missing() == []
