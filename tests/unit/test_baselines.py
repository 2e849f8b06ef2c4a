"""Model vs control vs position-only baseline: the best head is picked on val, compared on test."""
from __future__ import annotations

import pytest

from probes.reporting.baselines import compare_runs, comparison_markdown


def rows(val_best_layer: str, test_values: dict[str, float], position: float) -> list[dict]:
    out = []
    for layer, v in test_values.items():
        for split, value in (("val", 0.9 if layer == val_best_layer else 0.1), ("test", v)):
            out.append({"split": split, "task": "depth", "layer": layer, "step": 3, "timestep": 785.7,
                        "metric": "spearman", "value": value})
    out.append({"split": "test", "task": "depth", "layer": "position", "step": 3, "timestep": 785.7,
                "metric": "spearman", "value": position})
    return out


def test_margins_use_the_val_picked_head_not_the_best_test_value():
    model = rows("up3.0", {"up3.0": 0.7, "mid.0": 0.95}, position=0.3)   # mid.0 is better on test: never picked
    control = rows("mid.0", {"up3.0": 0.2, "mid.0": 0.1}, position=0.3)
    (r,) = compare_runs({"model": model, "control": control})
    assert r["model"] == 0.7 and r["control"] == 0.1 and r["position"] == 0.3
    assert r["margin vs control"] == pytest.approx(0.6) and r["margin vs position"] == pytest.approx(0.4)
    table = comparison_markdown([r], ["model", "control"])
    assert "0.700 (up3.0 @ step 3)" in table and "0.600" in table
