"""Reports without W&B (emergence, best heads, comparison, HTML), what goes to W&B (tables,
charts, panels, artifact), and loading probes from an artifact reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from probes.reporting.html import write_report
from probes.reporting.tables import best_heads, emergence_step, write_metrics_csv


def fake_rows(shift: float = 0.0) -> list[dict]:
    """Two layers x 5 steps; up3.0 rises to 0.8 by step 2; val prefers up3.0, test agrees."""
    rows = []
    curves = {"up3.0": [0.1, 0.5, 0.75, 0.8, 0.8], "mid.0": [0.2, 0.3, 0.3, 0.35, 0.4]}
    for split in ("val", "test"):
        for layer, curve in curves.items():
            for step, v in enumerate(curve):
                rows.append({"split": split, "task": "depth", "layer": layer, "step": step, "timestep": 999 - 200 * step,
                             "metric": "spearman", "value": v - shift + (0.01 if split == "val" else 0.0)})
                rows.append({"split": split, "task": "depth", "layer": layer, "step": step, "timestep": 999 - 200 * step,
                             "metric": "rmse", "value": 1 - v})
    return rows


def test_emergence_step_is_first_step_at_90_percent_of_final():
    curve = [(0, 999, 0.1), (1, 800, 0.5), (2, 600, 0.95), (3, 400, 1.0)]
    assert emergence_step(curve)["step"] == 2
    assert emergence_step(curve, fraction=0.5)["step"] == 1


def test_best_heads_are_picked_on_val_and_report_test():
    rows = fake_rows()
    for r in rows:  # make test prefer another head: the pick must not follow it
        if r["split"] == "test" and r["layer"] == "mid.0" and r["metric"] == "spearman":
            r["value"] = 0.99
    b = next(x for x in best_heads(rows) if x["metric"] == "spearman")
    assert (b["layer"], b["step"], b["selected_on"]) == ("up3.0", 3, "val")
    assert b["test"] == pytest.approx(0.8)
    r = next(x for x in best_heads(rows) if x["metric"] == "rmse")
    assert r["test"] == pytest.approx(0.2)  # lower is better


def test_report_is_self_contained_and_compares_runs(tmp_path):
    from probes.reporting.plots import plot_all

    real, control = tmp_path / "real", tmp_path / "control"
    for run, shift in ((real, 0.0), (control, 0.5)):
        rows = fake_rows(shift)
        write_metrics_csv(rows, run / "metrics.csv")
        plot_all(rows, run / "plots", "test")
    md, html = write_report(real, fake_rows(), is_random=True, compare=[control], labels=["real", "permuted"])
    text = md.read_text()
    assert "## Best (layer, step) per task and metric" in text and "| depth | spearman | up3.0 | 3 |" in text
    assert "## Knowledge beyond position" in text and "## Runs compared" in text and "permuted (layer, step)" in text
    assert "RANDOM WEIGHTS" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 3 and "src='plots/" not in page  # images embedded
    assert (real / "plots" / "compare_depth_spearman.png").is_file()


def test_report_command_compares_runs_in_a_folder_of_its_own(tmp_path):
    from probes.cli.main import main

    for run, shift in ((tmp_path / "a", 0.0), (tmp_path / "b", 0.3)):
        write_metrics_csv(fake_rows(shift), run / "metrics.csv")
        (run / "plots").mkdir()
    main(["report", "--runs", f"[{tmp_path / 'a'}, {tmp_path / 'b'}]", "--labels", "[model, control]",
          "--out", str(tmp_path / "cmp")])
    assert "control test" in (tmp_path / "cmp" / "report.md").read_text()
    assert not (tmp_path / "a" / "report.md").exists()       # the compared run's own report is untouched


def test_wandb_tables_and_charts_hold_the_right_rows():
    pytest.importorskip("wandb")
    from probes.reporting import wandb_tables as wandb_report

    rows = fake_rows()
    table = wandb_report.metrics_table(rows)
    assert table.columns == ["split", "task", "layer", "step", "timestep", "metric", "value", "with_prior", "gain"]
    assert len(table.data) == len(rows) and table.data[0][:3] == ["val", "depth", "up3.0"]
    assert table.data[0][-2:] == [None, None]       # these rows have no activation+prior heads
    charts = wandb_report.charts(rows)
    assert set(charts) == {f"charts/test/depth/{m}/{k}" for m in ("spearman", "rmse") for k in ("vs_step", "heatmap")}
    line = charts["charts/test/depth/spearman/vs_step"]
    assert len(line.table.data) == 10 and line.table.columns == ["step", "timestep", "layer", "value"]
    heat = charts["charts/test/depth/spearman/heatmap"]
    assert len(heat.table.data) == 10 and {r[0] for r in heat.table.data} == {"up3.0", "mid.0"}


def test_panel_table_has_one_row_per_image_and_step():
    pytest.importorskip("wandb")
    from probes.reporting.wandb_tables import panel_table

    panel = {"indices": [3, 7], "images": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.random.rand(2, 8, 8),
             "preds": np.random.rand(2, 4, 8, 8), "layer": "up3.0", "steps": [0, 1, 2, 3], "timesteps": [999, 666, 333, 0]}
    table = panel_table("depth", panel)
    assert len(table.data) == 8 and table.columns[-3:] == ["image", "label", "prediction"]
    assert [r[2] for r in table.data[:5]] == [3, 3, 3, 3, 7]


def _export(tmp: Path) -> Path:
    """A small real export, from a planted-signal run."""
    import pytorch_lightning as pl

    from probes.bench.planted import planted_datamodule
    from probes.export.probeset import export_probes
    from probes.training.ridge import RidgeProbeModule

    dm = planted_datamodule(tmp / "data", n=24)
    module = RidgeProbeModule()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return export_probes(module, tmp / "export")


def test_probe_artifact_holds_the_export(tmp_path):
    pytest.importorskip("wandb")
    from probes.reporting.wandb_tables import probe_artifact

    export = _export(tmp_path)
    art = probe_artifact(export, name="probes-test")
    assert art.type == "probes"
    assert set(art.manifest.entries) == {"probes.json", "probes.safetensors"}
    assert art.metadata["tasks"] == ["depth", "foreground", "shading"] and art.metadata["num_probes"] == 3 * 2 * 2
    assert art.metadata["model"]["model_id"] == "random:tiny"


def test_evaluate_loads_probes_from_an_artifact_reference(tmp_path, monkeypatch):
    import wandb

    from probes.export.resolve import resolve_probes

    export = _export(tmp_path)
    asked = {}

    class FakeArtifact:
        def download(self, root):
            shutil.copytree(export, root, dirs_exist_ok=True)
            return root

    class FakeApi:
        def artifact(self, name, type=None):
            asked.update(name=name, type=type)
            return FakeArtifact()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    path = resolve_probes("me/diffusion-probes/probes-abc:v0", cache_dir=tmp_path / "cache")
    assert asked == {"name": "me/diffusion-probes/probes-abc:v0", "type": "probes"}
    assert json.loads((path / "probes.json").read_text())["format"] == "diffusion-probes/v1"
    with pytest.raises(FileNotFoundError, match="neither a folder nor a W&B artifact"):
        resolve_probes("not-a-ref")
