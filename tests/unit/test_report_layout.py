"""Reports a reader can follow: sections per task with captions, readable plots and numbers,
an emergence step that means something for a declining curve, and comparison reports that hold
every plot."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.figure
import pytest

from probes.reporting.html import write_report
from probes.reporting.markup import fmt_percent, fmt_timestep, fmt_value
from probes.reporting.plots import plot_all, plot_metric_vs_step, rank_layers
from probes.reporting.tables import emergence_step, format_table, write_metrics_csv

T = [999.0, 927.6428833007812, 855.2857666015625, 0.0]


def rows_for(task: str, metric: str, curves: dict[str, list[float]], splits=("val", "test")) -> list[dict]:
    return [{"split": s, "task": task, "layer": layer, "step": k, "timestep": T[k], "metric": metric,
             "value": v + (0.01 if s == "val" else 0.0)}
            for s in splits for layer, c in curves.items() for k, v in enumerate(c)]


LAYERS = {f"up{i}.0": [0.1 * i, 0.1 * i + 0.1, 0.1 * i + 0.2, 0.1 * i + 0.2] for i in range(6)}


def demo_rows() -> list[dict]:
    rows = rows_for("depth", "spearman", LAYERS) + rows_for("foreground", "dice", LAYERS)
    rows += rows_for("depth", "spearman", {"decoded_noisy": [0.0, 0.2, 0.9, 1.0]}, splits=("test",))
    return rows


def classifier_rows(latent: str = "noisy") -> list[dict]:
    return (rows_for("classification", "top1", {f"classifier_{latent}": [0.25, 0.25, 0.5, 0.75]}, splits=("test",))
            + rows_for("classification", "prob", {f"classifier_{latent}": [0.3, 0.35, 0.5, 0.7]}, splits=("test",))
            + rows_for("classification", "top5", {f"classifier_{latent}": [1.0, 1.0, 1.0, 1.0]}, splits=("test",)))


# -- emergence ---------------------------------------------------------------------------------
def test_a_declining_curve_never_emerges_and_says_where_it_peaks():
    falling = [(0, 999.0, 0.43), (1, 800.0, 0.40), (2, 600.0, 0.25), (3, 0.0, 0.17)]
    e = emergence_step(falling)
    assert e["step"] is None and e["peak_step"] == 0 and e["peak"] == pytest.approx(0.43)
    assert e["note"] == "never emerges: peaks at step 0 (0.430), declines to 0.170"
    rising = [(0, 999.0, 0.1), (1, 800.0, 0.5), (2, 600.0, 0.95), (3, 0.0, 1.0)]
    assert emergence_step(rising)["step"] == 2                     # unchanged for a curve that builds up
    bump = [(0, 999.0, 0.1), (1, 800.0, 0.82), (2, 600.0, 0.8)]     # peak then within 10 %: still emerges
    assert emergence_step(bump)["step"] == 1
    assert emergence_step([(0, 999.0, 0.02), (1, 0.0, -0.01)])["step"] is None   # no signal at all


def test_emergence_is_measured_against_the_prior_map(tmp_path):
    """A curve that only matches the prior never emerges; one that builds a gain above it emerges where it holds
    90 % of that gain, not at step 0 as the old "90 % of the final score" rule had it."""
    rows = rows_for("depth", "spearman", {"up1.0": [0.80, 0.81, 0.80, 0.80], "up2.0": [0.80, 0.82, 0.88, 0.90]})
    rows += [{"split": s, "task": "depth", "layer": "prior", "step": k, "timestep": 999.0 - k, "metric": "spearman",
              "value": 0.80} for s in ("val", "test") for k in range(4)]
    from probes.reporting.beyond_position import task_summary

    s = task_summary(rows, None, "depth")
    (e,) = s["emergence"]
    assert s["probe_head"]["layer"] == "up2.0" and e["step"] == 3 and "no interval" in e["note"]
    rows = [r for r in rows if r["layer"] != "up2.0"]
    (e,) = task_summary(rows, None, "depth")["emergence"]
    assert e["step"] is None and e["note"].startswith("never")
    md, _ = write_report(tmp_path, rows, is_random=False)
    assert "Emergence relative to the prior map" in md.read_text() and "| never |" in md.read_text()


# -- numbers -----------------------------------------------------------------------------------
def test_numbers_are_written_as_people_read_them(tmp_path):
    assert fmt_value(1.35e-10) == "0.000" and fmt_value(-2e-9) == "0.000" and fmt_value(0.8534) == "0.853"
    assert fmt_value(float("nan")) == "nan" and fmt_timestep(927.6428833007812) == "927.6"
    rows = rows_for("foreground", "dice", {"up1.0": [1.35e-10, 1.35e-10, 1.35e-10, 1.35e-10]})
    table = format_table(rows, is_random=False)
    md, html = write_report(tmp_path, rows, is_random=False)
    for text in (table, md.read_text(), html.read_text()):
        assert "e-10" not in text and "927.6428" not in text
    assert "0.000" in table and "0.0" in table
    write_metrics_csv(rows, tmp_path / "metrics.csv")
    assert "927.6428833007812" in (tmp_path / "metrics.csv").read_text()   # full precision kept in the data
    assert fmt_percent(0.9354) == "93.5%" and fmt_percent(float("nan")) == "nan" and fmt_percent(None) == "—"


def test_sections_measured_beside_the_probes_come_first(tmp_path):
    rows = rows_for("foreground", "dice", {"up1.0": [0.1, 0.2, 0.3, 0.3]})
    md, html = write_report(tmp_path, rows, is_random=False,
                            sections=[("Sample quality", "| a | b |\n|---|---|\n| 1 | 2 |", "<table><tr><td>1</td></tr></table>")])
    text = md.read_text()
    assert text.index("## Sample quality") < text.index("## Best (layer, step)") and "| 1 | 2 |" in text
    assert "<h2>Sample quality</h2><table><tr><td>1</td></tr></table>" in html.read_text().replace("\n", "")


# -- plots -------------------------------------------------------------------------------------
@pytest.fixture
def saved(monkeypatch):
    """The figures plots save, inspected before they are closed."""
    figs: list[matplotlib.figure.Figure] = []
    real = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figs.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_best_layers_are_highlighted_and_picked_on_val(tmp_path, saved):
    rows = demo_rows()
    for r in rows:   # on test, up0.0 looks best; the highlight must follow val
        if r["split"] == "test" and r["layer"] == "up0.0":
            r["value"] += 5
    assert rank_layers(rows, "depth", "spearman", "test")[:3] == ["up5.0", "up4.0", "up3.0"]
    plot_metric_vs_step(rows, "test", "depth", "spearman", tmp_path / "p.png")
    ax = saved[-1].axes[0]
    thick = {ln.get_label() for ln in ax.lines if ln.get_linewidth() >= 2}
    grey = [ln for ln in ax.lines if ln.get_color() == "0.72"]
    assert {t.split(" ")[0] for t in thick} == {"up5.0", "up4.0", "up3.0"}
    assert len(grey) == 3 and all(ln.get_linewidth() < 1 for ln in grey)


def test_decoded_baseline_gets_its_own_axis(tmp_path, saved):
    rows = demo_rows()
    plot_metric_vs_step(rows, "test", "depth", "spearman", tmp_path / "d.png")
    top, below = saved[-1].axes
    assert not any("decoded" in ln.get_label() for ln in top.lines)
    assert any("decoded" in ln.get_label() for ln in below.lines)
    assert top.get_ylim()[1] < 1.0                      # probes keep their own scale (max 0.71)
    plot_metric_vs_step(rows, "test", "foreground", "dice", tmp_path / "f.png")
    assert len(saved[-1].axes) == 1                     # no baseline rows, no second panel


# -- the HTML report -----------------------------------------------------------------------------
def test_html_is_grouped_by_task_with_real_captions(tmp_path):
    rows = demo_rows()
    plot_all(rows, tmp_path / "plots", "test")
    _, html = write_report(tmp_path, rows, is_random=False)
    page = html.read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert heads.index("Depth") < heads.index("Foreground")
    depth = page[page.index("<h2>Depth</h2>"):page.index("<h2>Foreground</h2>")]
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", depth)
    assert len(captions) == 3 and captions[0].startswith("Depth: when does each reader find it?")
    assert "decoded from the noisy latent x_{t-1}" in captions[0]
    assert all(c.startswith("Depth, Spearman correlation") for c in captions[1:])
    assert not any(".png" in c or "_vs_step" in c or "_heatmap" in c for c in re.findall(r"<figcaption>(.*?)</figcaption>", page))
    assert "Other plots" not in page


def test_comparison_report_holds_the_comparison_and_the_first_runs_plots(tmp_path):
    from probes.cli.main import main

    for run, shift in ((tmp_path / "a", 0.0), (tmp_path / "b", 0.3)):
        rows = [dict(r, value=r["value"] - shift) for r in demo_rows()]
        write_metrics_csv(rows, run / "metrics.csv")
        plot_all(rows, run / "plots", "test")
    main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "model", "control",   # as the README writes it
          "--out", str(tmp_path / "cmp")])
    plots = {p.name for p in (tmp_path / "cmp" / "plots").glob("*.png")}
    assert {"compare_depth_spearman.png", "test_depth_spearman_vs_step.png", "test_depth_spearman_heatmap.png",
            "test_foreground_dice_vs_step.png"} <= plots
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "(plots/compare_depth_spearman.png)" in md and "(plots/test_depth_spearman_vs_step.png)" in md
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert not (tmp_path / "a" / "report.md").exists()


# -- the emergence figure: probe vs labeler on decoded images vs classifier ----------------------
def test_emergence_figure_draws_probe_labeler_and_classifier(tmp_path, saved):
    from probes.reporting.plots import emergence_curves

    rows = demo_rows() + classifier_rows()
    for r in rows:   # on test, up0.0 looks best; the probe curve must be the layer picked on val
        if r["split"] == "test" and r["layer"] == "up0.0":
            r["value"] += 5
    paths = plot_all(rows, tmp_path / "plots", "test")
    names = {p.name for p in paths}
    assert {"emergence_depth.png", "emergence_foreground.png"} <= names
    assert not any("classification" in n for n in names)      # no probe plots for the classifier's rows
    saved_by_title = {f.axes[0].get_title(loc="left").split(":")[0]: f for f in saved}
    left, right = saved_by_title["depth"].axes
    assert [ln.get_label() for ln in left.lines] == ["probe, layer up5.0 (picked on val)",
                                                     "labeler on decoded noisy latent x_{t-1}"]
    assert [ln.get_label() for ln in right.lines] == [
        "classifier on decoded noisy latent x_{t-1}: probability of the prompt's class",
        "classifier on decoded noisy latent x_{t-1}: top-1 accuracy"]
    assert list(right.lines[1].get_ydata()) == [0.25, 0.25, 0.5, 0.75]
    assert len(saved_by_title["foreground"].axes[0].lines) == 1       # no labeler rows: probe + classifier
    assert emergence_curves(rows, "foreground").keys() >= {"probe", "classifier prob", "classifier top-1"}


def test_no_emergence_figure_without_anything_to_compare():
    from probes.reporting.plots import plot_emergence

    rows = rows_for("depth", "spearman", LAYERS)
    assert plot_emergence(rows, "depth", Path("unused.png")) is None


def test_report_shows_the_emergence_figure_and_the_classifiers_emergence(tmp_path):
    rows = demo_rows() + classifier_rows("x0")
    plot_all(rows, tmp_path / "plots", "test")
    md, html = write_report(tmp_path, rows, is_random=False)
    text = md.read_text()
    assert "(plots/emergence_depth.png)" in text and "the classifier on the image decoded from the sampler's predicted x0" in text
    # top-1 0.25, 0.25, 0.5, 0.75: the first step reaching 90 % of the final 0.75 is the last one
    assert "| classification | top1 | classifier on decoded predicted x0 | 3 |" in text
