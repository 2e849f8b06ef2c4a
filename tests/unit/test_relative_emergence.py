"""Emergence relative to a baseline, on hand-made curves."""
from __future__ import annotations

import pytest

from probes.metrics.bootstrap import Interval
from probes.metrics.emergence import relative_emergence


def _gain(estimate, low, high):
    return Interval(estimate, low, high, 64, "percentile", 9999, statistic="difference")


def test_a_high_baseline_no_longer_makes_the_curve_emerge_at_step_zero():
    steps = [0, 1, 2, 3, 4]
    scores = [0.80, 0.82, 0.84, 0.86, 0.88]
    # the old rule: 0.80 >= 0.9 * 0.88, so "emerges at step 0"; the gain over 0.85 only builds up at the end
    assert scores[0] >= 0.9 * scores[-1]
    e = relative_emergence(steps, scores, 0.85, _gain(0.03, 0.01, 0.05))
    assert e.step == 4 and e.cell() == "4"
    assert e.fractions == pytest.approx((-5 / 3, -1, -1 / 3, 1 / 3, 1))


def test_first_step_at_ninety_percent_of_the_final_gain_with_a_per_step_baseline():
    steps = [0, 3, 6, 9]
    scores = [0.30, 0.60, 0.75, 0.80]
    control = [0.30, 0.35, 0.36, 0.40]                 # gains 0, .25, .39, .40 -> fractions 0, .625, .975, 1
    e = relative_emergence(steps, scores, control, _gain(0.40, 0.3, 0.5))
    assert e.step == 6 and e.note == "step 6"


def test_never_when_there_is_no_gain_or_it_is_not_distinguishable():
    steps = [0, 1, 2]
    lose = relative_emergence(steps, [0.70, 0.75, 0.78], 0.865, _gain(-0.085, -0.097, -0.071))
    assert lose.step is None and lose.cell() == "never" and "no gain" in lose.note
    noise = relative_emergence(steps, [0.55, 0.60, 0.66], 0.608, _gain(0.052, -0.001, 0.093))
    assert noise.step is None and "not distinguishable" in noise.note


def test_lower_is_better_and_consistency_checks():
    e = relative_emergence([0, 1, 2], [1.0, 0.6, 0.5], 1.0, _gain(0.5, 0.4, 0.6), lower_is_better=True)
    assert e.step == 2                                  # gains 0, .4, .5: .4/.5 = .8 < .9
    with pytest.raises(ValueError, match="final gain"):
        relative_emergence([0, 1], [0.5, 0.9], 0.5, _gain(-0.4, -0.5, -0.3))  # interval of baseline − probe
    with pytest.raises(ValueError, match="one value per step"):
        relative_emergence([0, 1], [0.5], 0.5, None)
    no_iv = relative_emergence([0, 1], [0.5, 0.9], 0.5, None)
    assert no_iv.step == 1 and "no interval" in no_iv.note
