"""The store under a hostile tester: deleted or truncated files, stray markers, concurrent runs, bad advice.

Each test reproduces one failure of issue 9 ("What the hostile tester found", items 1, 6, 7, 8, 9).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import probes.store.fill as stage
from probes.diffusion.loading import DiffusionSpec, load_hub_pipeline
from probes.export.probeset import FORMAT, META, WEIGHTS, ProbeSet
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.labels import build_labeler
from probes.labels.cache import LabelCache
from probes.prompts.sets import PromptSpec, load_prompts
from probes.store.activations import ActivationStore, check_disk
from probes.store.fill import ensure_store
from probes.store.manifest import request_fingerprint, store_request

TINY = DiffusionSpec(source="random", architecture="tiny")
GEN = GenerationSpec(steps=3, batch_size=2)
CAP = CaptureSpec(layers=["down1.0", "mid.0"], steps=[0, 2])


def records(prompts_file: Path):
    return load_prompts(PromptSpec(source=str(prompts_file)))[:4]


def make(root: Path, prompts_file: Path, gen: GenerationSpec = GEN) -> ActivationStore:
    return ensure_store(root, records(prompts_file), TINY, gen, CAP, "cpu", progress=False)


# -- 1. a deleted manifest ------------------------------------------------------------------
def test_a_deleted_manifest_is_refused_not_recreated_over_the_data(tmp_path, prompts_file):
    store = make(tmp_path / "s", prompts_file)
    images = np.array(store.images.array())
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match=r"(?s)4 commit markers.*no manifest\.json.*[Rr]estore.*delete"):
        make(tmp_path / "s", prompts_file)
    with pytest.raises(FileExistsError, match="no manifest.json"):   # the store API refuses as well
        ActivationStore.create(tmp_path / "s", store.manifest)
    kept = np.load(tmp_path / "s" / "images.npy", mmap_mode="r")
    assert np.array_equal(kept, images)                               # nothing was zeroed


def test_a_store_whose_creation_crashed_is_created_again(tmp_path, prompts_file):
    """Arrays without a manifest and without any commit marker hold nothing of value (a crash
    during creation): that folder is not "existing data" and is simply created again."""
    store = make(tmp_path / "s", prompts_file)
    (tmp_path / "s" / "manifest.json").unlink()
    for marker in (tmp_path / "s" / "commits").iterdir():
        marker.unlink()
    again = make(tmp_path / "s", prompts_file)
    assert again.missing() == [] and again.manifest["fingerprint"] == store.manifest["fingerprint"]


# -- 6. another generation batch size -------------------------------------------------------
def test_another_generation_batch_size_is_another_store(tmp_path, prompts_file):
    recs = records(prompts_file)
    fp = {bs: request_fingerprint(store_request(TINY, GenerationSpec(steps=3, batch_size=bs), CAP, recs))
          for bs in (2, 3)}
    assert fp[2] != fp[3]
    make(tmp_path / "s", prompts_file)
    with pytest.raises(ValueError, match=r"generation\.batch_size \(store: 2, now: 3\)"):
        make(tmp_path / "s", prompts_file, GenerationSpec(steps=3, batch_size=3))


# -- 7. errors that name the file -----------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


@pytest.mark.parametrize("name", ["images.npy", "acts/mid.0.npy"])
def test_a_truncated_array_is_named_when_the_store_is_opened(tmp_path, prompts_file, name):
    make(tmp_path / "s", prompts_file)
    truncate(tmp_path / "s" / name)
    with pytest.raises(ValueError, match=rf"(?s){name}.*truncated.*delete the store folder"):
        ActivationStore(tmp_path / "s")


def test_a_truncated_manifest_is_named(tmp_path, prompts_file):
    make(tmp_path / "s", prompts_file)
    truncate(tmp_path / "s" / "manifest.json")
    with pytest.raises(ValueError, match=r"(?s)manifest\.json is not valid JSON.*[Rr]estore"):
        ActivationStore(tmp_path / "s")


def test_an_array_of_another_shape_than_the_manifest_is_named(tmp_path, prompts_file):
    store = make(tmp_path / "s", prompts_file)
    np.save(tmp_path / "s" / "images.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images\.npy holds .*\(4, 8, 8, 3\).* the manifest says .*\(4, 128, 128, 3\)"):
        ActivationStore(store.root)


def test_a_commit_marker_out_of_range_is_named(tmp_path, prompts_file):
    make(tmp_path / "s", prompts_file)
    (tmp_path / "s" / "commits" / "0009999.json").write_text("{}")
    with pytest.raises(ValueError, match=r"(?s)0009999\.json.*sample 9999.*holds 4 samples.*delete"):
        ActivationStore(tmp_path / "s")


def test_a_truncated_label_array_is_named(tmp_path, prompts_file):
    store = make(tmp_path / "s", prompts_file)
    cache = LabelCache(store, "depth", build_labeler("vertical"))
    cache.ensure(range(4), progress=False)
    truncate(cache.path)
    with pytest.raises(ValueError, match=r"(?s)labels\.npy.*truncated"):
        LabelCache(store, "depth", build_labeler("vertical")).array()


def test_a_junk_safetensors_file_is_named(tmp_path):
    (tmp_path / META).write_text(json.dumps({"format": FORMAT, "probes": []}))
    (tmp_path / WEIGHTS).write_bytes(b"junk")
    with pytest.raises(ValueError, match=rf"(?s){WEIGHTS}.*not a readable safetensors file.*export"):
        ProbeSet(tmp_path)
    (tmp_path / META).write_text('{"format": ')
    with pytest.raises(ValueError, match=rf"{META} is not valid JSON"):
        ProbeSet(tmp_path)


# -- 8. concurrency ---------------------------------------------------------------------------
def test_two_runs_started_together_share_the_store(tmp_path, prompts_file, monkeypatch):
    """Both runs pass the "no manifest yet" check before either creates the store: the second
    must wait for the first and reuse its store, not die with FileExistsError."""
    both_checked = threading.Barrier(2)
    loads = []
    real_load = stage.load_pipeline

    def slow_load(*args, **kwargs):
        loads.append(threading.get_ident())
        try:
            both_checked.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return real_load(*args, **kwargs)

    monkeypatch.setattr(stage, "load_pipeline", slow_load)
    results, errors = [], []

    def run():
        try:
            results.append(make(tmp_path / "s", prompts_file))
        except Exception as err:  # noqa: BLE001 - the test reports it below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 2 and all(s.missing() == [] for s in results)
    assert len(loads) == 1                       # the second run found the store complete


def test_label_array_creation_never_truncates_another_runs_labels(tmp_path, prompts_file, monkeypatch):
    """Two label caches opened before either created the array (two runs labelling at once):
    the second one's creation must not truncate the labels the first one committed."""
    store = make(tmp_path / "s", prompts_file)
    first = LabelCache(store, "depth", build_labeler("vertical"))
    second = LabelCache(store, "depth", build_labeler("vertical"))
    first.ensure(range(4), progress=False)
    expected = np.array(first.array())
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: False if p == first.path else real_exists(p))
    second.ensure([0], progress=False)           # it checked "no array yet" before the first created it
    monkeypatch.setattr(Path, "exists", real_exists)
    np.testing.assert_array_equal(np.array(first.array()), expected)


def test_a_commit_marker_of_another_sample_is_refused(tmp_path, prompts_file):
    store = make(tmp_path / "s", prompts_file)
    marker = tmp_path / "s" / "commits" / "0000002.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(record, prompt="a different prompt", seed=12345)))
    seed = store.manifest["prompts"][2]["seed"]
    with pytest.raises(ValueError, match=rf"(?s)0000002\.json.*seed 12345.*manifest.*seed {seed}.*delete"):
        ActivationStore(tmp_path / "s")


def test_orphaned_temporary_files_are_swept_when_the_store_is_opened_for_writing(tmp_path, prompts_file):
    make(tmp_path / "s", prompts_file)
    old = [tmp_path / "s" / "commits" / "0000001.json.tmpab12cd", tmp_path / "s" / "manifest.json.tmpzz"]
    fresh = tmp_path / "s" / "commits" / "0000003.json.tmpfresh"     # maybe another run's, being written
    for p in (*old, fresh):
        p.write_text("{")
    past = time.time() - 3600
    for p in old:
        os.utime(p, (past, past))
    make(tmp_path / "s", prompts_file)
    assert not any(p.exists() for p in old) and fresh.exists()


def test_a_reused_store_says_so(tmp_path, prompts_file, capsys):
    make(tmp_path / "s", prompts_file)
    capsys.readouterr()
    make(tmp_path / "s", prompts_file)
    assert f"[store] reusing {tmp_path / 's'} (4 of 4 samples committed)" in capsys.readouterr().out


# -- 9. advice that names the right option or command --------------------------------------
def test_the_disk_advice_names_data_mode(tmp_path):
    with pytest.raises(Exception) as err:
        check_disk(tmp_path, 10**18, "the activation store")
    assert "data.mode=streaming" in str(err.value) and "probe_mode" not in str(err.value)


def test_the_missing_weights_advice_names_hf_download(monkeypatch):
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("not in the cache")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", offline)
    spec = DiffusionSpec(source="hub", model_id="CompVis/stable-diffusion-v1-4", local_files_only=True)
    with pytest.raises(RuntimeError) as err:
        load_hub_pipeline(spec, None)
    assert "hf download CompVis/stable-diffusion-v1-4" in str(err.value)
    assert "huggingface-cli" not in str(err.value)
