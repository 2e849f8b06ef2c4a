"""Outputs are written atomically and never through a link; paths from other people's files stay in their root.

Issue 18, "What the hostile tester found", item 1: links planted in a run folder redirected
``metrics.csv``, ``report.md``, ``probes/`` and the intervention's ``per_image.csv`` to files
elsewhere; ``report`` copied what a linked plot pointed to; ``evaluate --probes`` created a store
where the export said; a COCO ``file_name`` of ``../../secret/x.jpg`` was read.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.common.csv_rows import write_csv
from probes.common.files import PlantedLinkWarning, atomic_write_text, under_root
from probes.export.probeset import ProbeExport
from probes.reporting.results import RunResults
from probes.reporting.run_outputs import RunOutputs
from probes.reporting.tables import write_metrics_csv
from tests.exports import small_export
from tests.integration.test_reporting import fake_rows

REPO = Path(__file__).resolve().parents[2]
SECRET = "the victim's data: never overwritten, never copied"


def victim(tmp: Path, name: str) -> Path:
    path = tmp / "elsewhere" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=target.is_dir())


def test_run_outputs_replace_planted_links_and_leave_their_targets_alone(tmp_path):
    run = tmp_path / "run"
    targets = {name: victim(tmp_path, name) for name in ("metrics.csv", "summary.json", "report.md", "report.html")}
    for name, target in targets.items():
        plant(run / name, target)
    probes_target = tmp_path / "elsewhere" / "probes_dir"
    probes_target.mkdir()
    plant(run / "probes", probes_target)
    plots_target = tmp_path / "elsewhere" / "plots_dir"
    plots_target.mkdir()
    plant(run / "plots", plots_target)
    results = RunResults(rows=fake_rows(), best=[], summary={"model": {}, "is_random": True, "store_dir": "x",
                                                             "best": [], "num_probes": 0},
                         export=ProbeExport({"depth/up3.0/step_00/weight": torch.zeros(4, 1)},
                                            {"format": "diffusion-probes/v1", "probes": []}))
    with pytest.warns(PlantedLinkWarning):
        RunOutputs(link_store=False).write(results, run)
    for target in targets.values():
        assert target.read_text() == SECRET                       # nothing written through a link
    assert list(probes_target.iterdir()) == [] and list(plots_target.iterdir()) == []
    for name in [*targets, "probes", "plots"]:
        assert not (run / name).is_symlink(), name                # the links were replaced by the outputs
    assert (run / "probes" / "probes.safetensors").is_file() and (run / "plots").is_dir()
    assert "split,task,layer" in (run / "metrics.csv").read_text()


def test_the_csv_writer_and_text_writer_replace_a_link_and_leave_no_temporary(tmp_path):
    target = victim(tmp_path, "per_image.csv")
    plant(tmp_path / "run" / "per_image.csv", target)
    with pytest.warns(PlantedLinkWarning, match="per_image.csv"):
        write_csv([{"a": 1}], ["a"], tmp_path / "run" / "per_image.csv")
    assert target.read_text() == SECRET
    assert (tmp_path / "run" / "per_image.csv").read_text().splitlines() == ["a", "1"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["per_image.csv"]     # no temporary left
    with warnings.catch_warnings():
        warnings.simplefilter("error")                             # an ordinary file: no warning
        atomic_write_text(tmp_path / "run" / "per_image.csv", "again")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.csv"
    write_metrics_csv(fake_rows(), path)
    before = path.read_text()

    def rows():
        yield fake_rows()[0]
        raise KeyboardInterrupt                                  # killed halfway through writing

    with pytest.raises(KeyboardInterrupt):
        write_metrics_csv(rows(), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


#: direct file writes allowed outside probes/common/files.py, each with why
ALLOWED_DIRECT_WRITES = {
    ("probes/store/activations.py", "os.open"): "writes sample rows in place into a preallocated array it created",
    ("probes/store/activations.py", "open_memmap(tmp"): "preallocates an array under a temporary name, then renames it",
    ("probes/reporting/run_outputs.py", "per_image.save("): "PerImageScores.save writes through atomic_write",
    ("probes/store/locks.py", "open("): "the store's lock file (opened for locking, holds only a pid)",
    ("probes/recipes/toy_model/recipe.py", ".model.save("): "the tokenizers library writes the vocabulary into a "
                                                           "temporary folder that is renamed whole",
}
WRITE_CALLS = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wa]b?\+?[\"']|\.savefig\(|np\.save\(|"
                         r"np\.savez|torch\.save\(|save_file\(|\.save\(|os\.open\(|open_memmap\(")


def test_every_output_goes_through_the_atomic_writer():
    """No module writes a file on its own: each uses probes.common.files (or is listed above, with why)."""
    offenders = []
    for path in sorted((REPO / "probes").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "probes/common/files.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for _ in WRITE_CALLS.finditer(code):
                if not any(rel == f and needle in code for (f, needle) in ALLOWED_DIRECT_WRITES):
                    if re.search(r"\(f,|, f\)", code):
                        continue   # into the file object atomic_write opened
                    offenders.append(f"{rel}:{n}: {line.strip()}")
                    break
    assert not offenders, "direct file writes (use probes.common.files):\n" + "\n".join(offenders)


def test_report_never_copies_or_embeds_what_a_linked_plot_points_to(tmp_path):
    from probes.cli.evaluate import report

    run = tmp_path / "run"
    write_metrics_csv(fake_rows(), run / "metrics.csv")
    (run / "plots").mkdir()
    secret = victim(tmp_path, "passwd")
    plant(run / "plots" / "test_depth_spearman_vs_step.png", secret)   # a plot name, pointing at a secret
    out = report([str(run)], out=str(tmp_path / "cmp"))
    assert not (out / "plots" / "test_depth_spearman_vs_step.png").exists()
    import base64

    page = (out / "report.html").read_text()
    assert base64.b64encode(SECRET.encode()).decode()[:20] not in page
    # the whole plots folder a link elsewhere: nothing of it is copied either
    linked = tmp_path / "run2"
    write_metrics_csv(fake_rows(), linked / "metrics.csv")
    plant(linked / "plots", secret.parent)
    (secret.parent / "x.png").write_text(SECRET)
    out2 = report([str(linked)], out=str(tmp_path / "cmp2"))
    assert not (out2 / "plots" / "x.png").exists()


def test_evaluate_never_makes_a_store_where_an_untrusted_export_says(tmp_path, monkeypatch):
    import probes.cli.evaluate as ev

    planted = tmp_path / "elsewhere" / "store"
    export = small_export(tmp_path / "export", store_dir=planted)
    seen = {}

    class Stop(Exception):
        pass

    def capture(cfg, **overrides):
        seen.update(cfg={**cfg, **overrides})
        raise Stop

    monkeypatch.setattr(ev.ActivationDataModule, "from_config", staticmethod(capture))
    with pytest.raises(Stop):
        ev.evaluate(str(export), out=str(tmp_path / "eval"), store_root=str(tmp_path / "stores"))
    assert seen["cfg"].get("store_dir") in (None, "")           # not the recorded path ...
    assert seen["cfg"]["store_root"] == str(tmp_path / "stores")  # ... the one given here
    assert not planted.exists()
    with pytest.raises(Stop):   # asked explicitly: the recorded store is used
        ev.evaluate(str(export), out=str(tmp_path / "eval"), trust_export_store=True)
    assert seen["cfg"]["store_dir"] == str(planted)
    with pytest.raises(Stop):   # a store named on the command line always wins
        ev.evaluate(str(export), out=str(tmp_path / "eval"), store_dir=str(tmp_path / "mine"))
    assert seen["cfg"]["store_dir"] == str(tmp_path / "mine")


def test_paths_inside_untrusted_files_stay_under_their_root(tmp_path):
    assert under_root(tmp_path, "val2017/x.jpg", "file_name", "a.json") == tmp_path / "val2017" / "x.jpg"
    for bad in ("../../secret/x.jpg", "/etc/passwd", "a/../../b.jpg", "..", ""):
        with pytest.raises(ValueError, match=r"a\.json: file_name .* leaves the folder"):
            under_root(tmp_path, bad, "file_name", "a.json")


def write_coco(root: Path, file_name: str) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16.0,
                         "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}],
        "categories": [{"id": 1, "name": "thing"}]}))


def test_a_coco_file_name_that_leaves_the_image_folder_is_refused(tmp_path):
    from PIL import Image

    from probes.experiments.lens.datasets import CocoInstances

    secret = tmp_path / "secret" / "x.jpg"
    secret.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    root = tmp_path / "coco" / "deep"
    write_coco(root, "../../../secret/x.jpg")
    with pytest.raises(ValueError, match=r"instances_val2017\.json: COCO file_name '\.\./\.\./\.\./secret/x\.jpg' "
                                         r"leaves the folder"):
        CocoInstances(root)[0]


def test_voc_and_davis_names_that_leave_their_root_are_refused(tmp_path):
    from probes.experiments.lens.datasets import DavisSequences, VocInstances

    voc = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("../../secret/x\n")
    with pytest.raises(ValueError, match=r"val\.txt: VOC image name '\.\./\.\./secret/x' leaves the folder"):
        VocInstances(voc)
    davis = tmp_path / "davis"
    for folder in ("JPEGImages/480p", "Annotations/480p", "ImageSets/2017"):
        (davis / folder).mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("../../../secret\n")
    with pytest.raises(ValueError, match=r"val\.txt: DAVIS sequence '\.\./\.\./\.\./secret' leaves the folder"):
        DavisSequences(davis)
