"""The SD v1.4 paper's numbers are drawn on SD v1.4 runs only (issue 18): on the toy world or a
random model a "published 0.85" line compares nothing and misleads."""
from __future__ import annotations

import matplotlib.axes

from probes.reporting.plots import plot_metric_vs_step
from tests.integration.test_reporting import fake_rows


def lines_drawn(monkeypatch, tmp_path, published: bool) -> list[str]:
    labels: list[str] = []
    real = matplotlib.axes.Axes.axhline

    def spy(self, *args, **kwargs):
        labels.append(str(kwargs.get("label")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy)
    plot_metric_vs_step(fake_rows(), "test", "foreground", "dice", tmp_path / "p.png", published=published)
    return labels


def test_published_line_only_when_asked(monkeypatch, tmp_path):
    assert any("published" in label for label in lines_drawn(monkeypatch, tmp_path, True))
    assert not any("published" in label for label in lines_drawn(monkeypatch, tmp_path, False))
