"""Nothing is ever selected on the test split: best heads, the per-step curve, highlighted layers,
run comparisons and the report, with and without a validation split; and which fits may run without one."""
from __future__ import annotations

import pytest

from probes.reporting.beyond_position import task_summary
from probes.reporting.html import write_report
from probes.reporting.plots import plot_all, rank_layers
from probes.reporting.tables import NO_SELECTION, _curve, best_heads, format_table, write_metrics_csv
from probes.training.datamodule import selects_on_validation
from tests.integration.test_reporting import fake_rows


def only_test_rows() -> list[dict]:
    """``fake_rows`` without its validation rows: what a run without val split writes."""
    return [r for r in fake_rows() if r["split"] == "test"]


def test_best_heads_picks_nothing_without_val_and_never_on_test():
    assert best_heads(only_test_rows()) == []
    with pytest.raises(ValueError, match="test split is refused"):
        best_heads(fake_rows(), select_split="test")


def test_per_step_curve_follows_the_layer_best_on_val_not_the_test_maximum():
    rows = fake_rows()
    for r in rows:   # on test, mid.0 is now far better at every step; val still prefers up3.0 from step 1
        if r["split"] == "test" and r["layer"] == "mid.0" and r["metric"] == "spearman":
            r["value"] = 0.99
    curve = _curve(rows, "test", "depth", "spearman", None)
    # step 0: val prefers mid.0 (0.21 > 0.11) -> its test value; steps 1-4: up3.0's test values
    assert [v for _, _, v in curve] == pytest.approx([0.99, 0.5, 0.75, 0.8, 0.8])
    assert _curve(only_test_rows(), "test", "depth", "spearman", None) == []


def with_prior_rows(rows: list[dict], value: float = 0.3) -> list[dict]:
    """``rows`` plus a prior map scoring ``value`` on every split of theirs."""
    return rows + [{"split": s, "task": "depth", "layer": "prior", "step": k, "timestep": 999 - 200 * k,
                    "metric": "spearman", "value": value} for s in {r["split"] for r in rows} for k in range(5)]


def test_emergence_without_val_follows_the_pre_declared_layer_only():
    s = task_summary(with_prior_rows(only_test_rows()), None, "depth")
    assert s["probe_head"]["layer"] == "up3.0" and s["probe_head"]["selected_on"].startswith("none")
    assert [e["curve"] for e in s["emergence"]] == ["probe, layer up3.0"]
    assert s["emergence"][0]["step"] == 2          # (0.75 - 0.3) / (0.8 - 0.3) = 0.9
    assert s["gain_head"] is None                   # nothing with a with_prior column to pick from


def test_plots_rank_nothing_without_val(tmp_path):
    assert rank_layers(only_test_rows(), "depth", "spearman", "test") == []
    assert rank_layers(fake_rows(), "depth", "spearman", "test")[0] == "up3.0"
    assert all(p.is_file() for p in plot_all(only_test_rows(), tmp_path / "plots"))


def test_report_and_table_say_that_nothing_is_selected(tmp_path):
    rows = only_test_rows()
    plot_all(rows, tmp_path / "plots")
    md, html = write_report(tmp_path, rows, is_random=False)
    text = md.read_text()
    assert NO_SELECTION in text and "Picked on the validation split" not in text
    assert "pre-declared layer up3.0" in text and NO_SELECTION in html.read_text()
    assert NO_SELECTION in format_table(rows, False)
    (tmp_path / "v").mkdir()
    with_val = write_report(tmp_path / "v", fake_rows(), is_random=False)[0].read_text()
    assert NO_SELECTION not in with_val and "Picked on the validation split" in with_val


def test_compare_runs_without_val_uses_the_pre_declared_head(tmp_path):
    rows = with_prior_rows(only_test_rows())
    model, control = task_summary(rows, None, "depth"), task_summary(with_prior_rows(fake_rows(shift=0.3)), None, "depth")
    assert (model["probe_head"]["layer"], model["probe_head"]["step"]) == ("up3.0", 4)
    assert model["point"]["probe"] == pytest.approx(0.8)
    assert (control["probe_head"]["layer"], control["probe_head"]["step"]) == ("up3.0", 3)   # picked on its val
    ctrl = tmp_path / "c"
    write_metrics_csv(fake_rows(shift=0.3), ctrl / "metrics.csv")
    (tmp_path / "r").mkdir()
    md, _ = write_report(tmp_path / "r", rows, False, compare=[ctrl], labels=["model", "control"])
    assert "up3.0, 4 (pre-declared, no val split)" in md.read_text()


class _Model:
    def __init__(self, selection="last", one_pass=False):
        self.hparams = {"selection": selection}
        self.one_pass = one_pass


def test_only_fits_that_select_need_a_validation_split():
    assert not selects_on_validation(_Model("last"))
    assert selects_on_validation(_Model("best_val"))
    assert selects_on_validation(_Model("last", one_pass=True))   # ridge picks λ on val
    assert selects_on_validation(None)                          # unknown model: assume it selects
