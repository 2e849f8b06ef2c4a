"""Damaged or foreign inputs are refused instead of turning into plausible numbers.

Issue 18, "What the hostile tester found", item 2 (silently wrong numbers) and item 5 (a resume with
another batch size leaves the old store without a word).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from probes.export.probeset import META, WEIGHTS, load_probes
from probes.generation.sampling import GenerationSpec
from probes.reporting.tables import COLUMNS, read_metrics_csv, write_metrics_csv
from probes.store.activations import ActivationStore
from tests.exports import TINY, small_export
from tests.integration.test_reporting import fake_rows
from tests.integration.test_store_robustness import make, records


def precise_rows() -> list[dict]:
    return [dict(r, value=r["value"] + 0.0123) for r in fake_rows()]


def finished_run(tmp: Path) -> Path:
    """A run folder as a run leaves it: metrics.csv, then summary.json recording it."""
    from probes.reporting.results import RunResults
    from probes.reporting.run_outputs import RunOutputs

    run = tmp / "run"
    RunOutputs(plots=False, link_store=False).write(
        RunResults(rows=precise_rows(), best=[], summary={"model": {}, "is_random": True, "store_dir": "x", "best": [],
                                                          "num_probes": 0}), run)
    return run


def report(run: Path, tmp: Path):
    from probes.cli.evaluate import report as report_command

    return report_command([str(run)], out=str(tmp / "cmp"))


# -- metrics.csv ------------------------------------------------------------------------------
def test_a_finished_run_records_its_metrics_file_and_reports(tmp_path):
    run = finished_run(tmp_path)
    record = json.loads((run / "summary.json").read_text())["metrics_csv"]
    assert record["rows"] == len(precise_rows()) and len(record["sha256"]) == 64
    assert (report(run, tmp_path) / "report.md").is_file()


def test_a_header_only_metrics_file_is_refused(tmp_path):
    run = finished_run(tmp_path)
    path = run / "metrics.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"(?s)metrics\.csv.*no rows"):
        report(run, tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.93])
def test_a_truncated_metrics_file_is_refused_even_without_its_record(tmp_path, keep):
    """Cut anywhere (in a line or at a line end, a row group or a whole split short): refused by its shape alone."""
    path = tmp_path / "metrics.csv"
    write_metrics_csv(precise_rows(), path)
    text = path.read_text()
    path.write_text(text[:int(len(text) * keep)])
    with pytest.raises(ValueError, match=r"metrics\.csv.*(truncated|incomplete|line)"):
        read_metrics_csv(path)
    lines = text.splitlines()
    path.write_text("\n".join(lines[:-7]) + "\n")            # whole rows missing at the end
    with pytest.raises(ValueError, match=r"(?s)metrics\.csv.*incomplete.*depth/rmse"):
        read_metrics_csv(path)


def test_a_value_cut_short_is_caught_by_the_record(tmp_path):
    run = finished_run(tmp_path)
    path = run / "metrics.csv"
    lines = path.read_text().rstrip("\n").split("\n")
    fields = lines[-1].split(",")
    value = COLUMNS.index("value")
    assert len(fields[value]) > 4
    fields[value] = fields[value][:3]                           # "0.21230..." -> "0.2": a well-formed row
    path.write_text("\n".join([*lines[:-1], ",".join(fields)]) + "\n")
    with pytest.raises(ValueError, match=r"(?s)metrics\.csv does not match.*summary\.json.*half-written"):
        report(run, tmp_path)


def test_a_value_that_is_not_a_number_names_the_line(tmp_path):
    path = tmp_path / "metrics.csv"
    write_metrics_csv(precise_rows(), path)
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[COLUMNS.index("value")] = "abc"
    lines[3] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.csv, line 4: value 'abc' is not a number"):
        read_metrics_csv(path)


def test_a_truncated_summary_is_named(tmp_path):
    run = finished_run(tmp_path)
    (run / "summary.json").write_text('{"is_random": tr')
    with pytest.raises(ValueError, match=r"summary\.json is not valid JSON.*rerun"):
        report(run, tmp_path)


# -- probe exports ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probe_weights_are_refused(tmp_path, bad):
    export = small_export(tmp_path / "e", weight=bad)
    with pytest.raises(ValueError, match=r"(?s)probes\.safetensors.*foreground/mid\.0/step_00/weight.*not finite"):
        load_probes(export)
    from probes.experiments.intervention.config import InterventionConfig
    from probes.experiments.intervention.run import intervene

    with pytest.raises(ValueError, match="not finite"):        # the intervention loads through load_probes
        intervene(InterventionConfig(probes=str(export), out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def test_a_binary_probe_relabelled_regression_is_refused(tmp_path):
    export = small_export(tmp_path / "e")
    meta = json.loads((export / META).read_text())
    for e in meta["probes"]:
        if e["task"] == "foreground":
            e["kind"] = "regression"
    (export / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"(?s)probes\.json.*foreground.*kind 'regression'.*binary"):
        load_probes(export)


def test_weights_that_do_not_belong_to_the_metadata_are_refused(tmp_path):
    export = small_export(tmp_path / "e")
    tensors = load_file(str(export / WEIGHTS))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2                           # plausible values, not the exported ones
    save_file(tensors, str(export / WEIGHTS))
    with pytest.raises(ValueError, match=r"(?s)probes\.safetensors.*sha256.*probes\.json.*records"):
        load_probes(export)


def test_probes_of_another_model_are_not_used_to_edit_this_one(tmp_path, tiny_pipe):
    from dataclasses import replace

    from probes.experiments.intervention.session import InterventionSession

    other = replace(TINY, init_seed=1)
    export = small_export(tmp_path / "e", model=dict(other.identity(), is_random=True))
    with pytest.raises(ValueError, match=r"(?s)trained on.*init_seed=1.*init_seed=0.*allow_other_model"):
        InterventionSession(load_probes(export), "foreground", "cpu")
    session = InterventionSession(load_probes(export), "foreground", "cpu", pipe=tiny_pipe, allow_other_model=True)
    assert session.size == (128, 128)


# -- the store --------------------------------------------------------------------------------
def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_one_flipped_byte_in_an_activation_array_is_detected(tmp_path, prompts_file):
    from probes.training.datasets import ActivationDataset

    store = make(tmp_path / "s", prompts_file)
    arr = store.acts["mid.0"]
    flip_byte(arr.path, arr.offset + arr.row_bytes + 5)       # sample 1
    store = ActivationStore(tmp_path / "s")
    np.asarray(store.activation("mid.0", 0))                  # sample 0 is intact
    with pytest.raises(ValueError, match=r"(?s)acts/mid\.0\.npy.*sample 1.*checksum.*delete the store folder"):
        store.activation("mid.0", 1)
    ds = ActivationDataset(ActivationStore(tmp_path / "s"), [0, 1, 2], {})
    with pytest.raises(ValueError, match=r"sample 1.*checksum"):
        ds.__getitems__([0, 1, 2])
    with pytest.raises(ValueError, match=r"sample 1.*checksum"):
        ActivationStore(tmp_path / "s").verify()


def test_a_hand_edited_manifest_is_refused(tmp_path, prompts_file):
    make(tmp_path / "s", prompts_file)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["capture"]["steps"] = [0, 1]                      # was [0, 2]: would relabel every row
    path.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(ValueError, match=r"(?s)manifest\.json.*edited.*delete the store folder"):
        ActivationStore(tmp_path / "s")


def test_a_resume_with_another_batch_size_names_the_store_it_leaves(tmp_path, prompts_file, capsys):
    from probes.store.fill import ensure_store
    from tests.integration.test_store_robustness import CAP
    from tests.integration.test_store_robustness import TINY as STORE_MODEL

    old = make(tmp_path / "stores" / "a", prompts_file)
    for marker in sorted((old.root / "commits").glob("*.json"))[2:]:
        marker.unlink()                                      # killed halfway
    capsys.readouterr()
    ensure_store(tmp_path / "stores" / "b", records(prompts_file), STORE_MODEL, GenerationSpec(steps=3, batch_size=3), CAP,
                 "cpu", progress=False)
    out = capsys.readouterr().out
    assert f"{tmp_path / 'stores' / 'a'}" in out and "generation.batch_size=2" in out
    assert "2 of 4 samples" in out and ("MB" in out or "KB" in out)


# -- lens and COCO ----------------------------------------------------------------------------
def test_a_nan_in_a_committed_lens_embedding_is_refused(tmp_path):
    from probes.diffusion.layers import LayerInfo
    from probes.experiments.lens.datasets.toy import ToyWorld
    from probes.experiments.lens.embeddings import EmbeddingCache, PoolingSpec, cache_request, dataset_fingerprint

    data = ToyWorld(n=3, size=32)
    layer = LayerInfo("up3.0", "x", 4, (8, 8))
    request = cache_request({"model_id": "test"}, [layer], {}, PoolingSpec(max_objects=4), dataset_fingerprint(data),
                            None, len(data))
    cache = EmbeddingCache.open_or_create(tmp_path, request)
    rng = np.random.default_rng(0)
    cache.fill(iter(data), lambda images, keys: {"up3.0": rng.normal(size=(len(images), 4, 8, 8)).astype(np.float32)},
               progress=False)
    path = cache.arrays["up3.0"].path
    mm = np.load(path, mmap_mode="r+")
    mm[1, 0, 2] = np.nan                                      # item 1's first object
    mm.flush()
    del mm
    with pytest.raises(ValueError, match=r"(?s)emb/up3\.0\.npy.*item 1.*not finite.*delete"):
        EmbeddingCache(cache.root).load()


def test_coco_annotations_of_undefined_categories_are_refused(tmp_path):
    from probes.experiments.lens.datasets import CocoInstances
    from tests.integration.test_safe_outputs import write_coco

    write_coco(tmp_path, "x.jpg")
    path = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017\.json: annotation 1 has category_id 99, which 'categories' "
                                         r"does not define"):
        CocoInstances(tmp_path)


def test_intact_stores_and_exports_still_open(tmp_path, prompts_file):
    """The checks above refuse damage only: an untouched store and export read as before."""
    store = make(tmp_path / "s", prompts_file)
    store.verify()
    assert np.asarray(store.activation("mid.0", 3)).shape[0] == 2
    probes = load_probes(small_export(tmp_path / "e"))
    assert torch.isfinite(probes.get("depth", "up3.0", 1).weight).all()


def test_a_store_written_before_checksums_still_has_its_nans_named(tmp_path):
    """Markers without checksums (stores made before them) are read unchecked: the non-finite checks of
    training still name a NaN activation with its layer, step, sample and prompt."""
    from tests.integration.test_nonfinite import ProbeModule, corrupt, planted_datamodule, reopened, sample_of, trainer

    dm = planted_datamodule(tmp_path, n=16)
    dm.setup("fit")
    for marker in (dm.store.root / "commits").glob("*.json"):
        rec = json.loads(marker.read_text())
        rec.pop("checksums")
        marker.write_text(json.dumps(rec))
    i = sample_of(dm, "train")
    corrupt(dm.store.root / "acts" / "up3.0.npy", i, (1, 0, 2, 3))
    with pytest.raises(ValueError) as err:
        trainer().fit(ProbeModule(), datamodule=reopened(dm))
    msg = str(err.value)
    assert "non-finite" in msg and "checksum" not in msg
    assert "up3.0" in msg and "step 1" in msg and f"sample {i}" in msg and f"synthetic {i}" in msg
