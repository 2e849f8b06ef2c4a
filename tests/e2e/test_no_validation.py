"""A run without validation split (the reference-exact way: every train image trains, selection: last)
fits, evaluates and reports end to end on the tiny model, and nothing is selected on test."""
from __future__ import annotations

import json

import pytest

from probes.reporting.tables import NO_SELECTION, best_heads, read_metrics_csv
from tests.e2e.test_cli import run_inprocess

COMMON = ("--config", "configs/tiny.yaml", "--data.prompts.val_fraction", "0", "--data.prompts.limit", "3",
          "--trainer.max_epochs", "1", "--data.generation.decode", "none", "--trainer.logger", "false")


@pytest.fixture(scope="module")
def no_val_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noval")
    stdout = run_inprocess("fit", *COMMON, "--run_dir", str(tmp / "run"), "--data.store_root", str(tmp / "stores"))
    return tmp, stdout


def test_fit_without_val_runs_and_selects_nothing(no_val_run):
    tmp, stdout = no_val_run
    run = tmp / "run"
    rows = read_metrics_csv(run / "metrics.csv")
    assert {r["split"] for r in rows} == {"test"}                   # no val split at all: 3 train + 3 test prompts
    assert best_heads(rows) == [] and json.loads((run / "summary.json").read_text())["best"] == []
    assert NO_SELECTION in stdout and NO_SELECTION in (run / "report.md").read_text()
    assert "Picked on the validation split" not in (run / "report.md").read_text()
    assert "pre-declared layer up3.0" in (run / "report.md").read_text()


def test_evaluate_without_val_selects_nothing(no_val_run):
    tmp, _ = no_val_run
    from probes.cli.main import evaluate_main

    evaluate_main(["--probes", str(tmp / "run" / "probes"), "--out", str(tmp / "eval")])
    report = (tmp / "eval" / "report.md").read_text()
    assert NO_SELECTION in report and json.loads((tmp / "eval" / "summary.json").read_text())["best"] == []


def test_fits_that_select_are_still_refused_without_val(tmp_path):
    for extra in (["--model.init_args.selection", "best_val"], ["--model", "configs/model/ridge.yaml"]):
        with pytest.raises(BaseException) as err:
            run_inprocess("fit", *COMMON, *extra, "--run_dir", str(tmp_path / "r"), "--data.store_root",
                          str(tmp_path / "stores"))
        assert "validation" in str(err.value) and "val_fraction" in str(err.value)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())   # refused before compute


def test_mean_difference_probes_fit_without_val_and_record_their_loss(tmp_path):
    """Mean-difference probes select nothing, so they fit without val; the export says how they were
    fitted (the intervention edits with that loss) and carries their bias."""
    from probes.export.probeset import load_probes

    run = tmp_path / "run"
    run_inprocess("fit", *COMMON, "--model", "configs/model/mean_difference.yaml", "--run_dir", str(run),
                  "--data.store_root", str(tmp_path / "stores"))
    probes = load_probes(run / "probes")
    assert probes.binary_fit_loss == "squared"
    assert all(p.bias is not None for p in probes)
    rows = read_metrics_csv(run / "metrics.csv")
    assert rows and {r["split"] for r in rows} == {"test"} and best_heads(rows) == []
