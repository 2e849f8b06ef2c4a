"""When a probe's signal appears, measured against a baseline rather than against zero.

The old rule, "the first step whose score reaches 90 % of the final score", fires at step 0
whenever something other than the activations already scores high: a depth probe that only
learnt the typical layout scores 0.8 from the first step, so it "emerges" at once. What should
emerge is the part of the score a baseline cannot explain:

    fraction_s = (score_s − baseline_s) / (score_final − baseline_final)

and the emergence step is the first step with ``fraction_s >= 0.9`` (default).

**The baseline per step** is the score, on the same test images with the same metric, of the
reference the curve must beat at that step:

- the prior map (:mod:`probes.metrics.prior_map`) for "beyond position": it ignores the image,
  so its score is one number, the same at every step (pass a scalar);
- a same-image control (random features on the model's own x_t) for "beyond random features":
  its score at step ``s`` (pass the per-step curve).

There is nothing to emerge ("never") when the final gain ``score_final − baseline_final`` is not
positive, or when its paired bootstrap interval over images contains 0 (not distinguishable from
no gain). For lower-is-better metrics pass ``lower_is_better=True``: gains are then
``baseline − score`` and the interval must be of ``baseline − probe`` per image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from probes.metrics.bootstrap import Interval, format_interval

FRACTION = 0.9


@dataclass(frozen=True)
class Emergence:
    """:param step: the emergence step, or None for "never".
    :param note: the reason in words, for tables (``step 3``, ``never: ...``).
    :param fractions: the share of the final gain reached at each step (empty when never computed).
    """

    step: int | None
    note: str
    fractions: tuple[float, ...] = ()

    def cell(self) -> str:
        """What a table prints: the step number, or ``never``."""
        return "never" if self.step is None else str(self.step)


def relative_emergence(steps: Sequence[int], scores: Sequence[float], baseline: float | Sequence[float],
                       final_gain: Interval | None, fraction: float = FRACTION,
                       lower_is_better: bool = False) -> Emergence:
    """The first step where the probe holds ``fraction`` of its final gain over ``baseline`` (module doc).

    :param steps: step labels, in denoising order; the last one is "final".
    :param scores: the probe's mean test score at each step.
    :param baseline: the baseline's mean test score: one number (position baselines) or one per step.
    :param final_gain: the paired bootstrap interval of the per-image gain at the final step
        (:func:`probes.metrics.bootstrap.difference_interval` of probe vs baseline, oriented so
        that positive = probe better); None if there is none, which the note then says.
    """
    n = len(steps)
    base = [float(baseline)] * n if isinstance(baseline, (int, float)) else [float(b) for b in baseline]
    if not n or len(scores) != n or len(base) != n:
        raise ValueError(f"steps, scores and baseline must have one value per step; got {n}, {len(scores)}, "
                         f"{len(base)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    sign = -1.0 if lower_is_better else 1.0
    gains = [sign * (float(s) - b) for s, b in zip(scores, base)]
    final = gains[-1]
    if final != final:
        return Emergence(None, "never: no score at the last step")
    if final_gain is not None and not math.isclose(final_gain.estimate, final, abs_tol=1e-4):
        raise ValueError(f"final_gain.estimate={final_gain.estimate:.6f} is not the curve's final gain {final:.6f}: "
                         f"pass the interval of (probe − baseline) per image at step {steps[-1]}"
                         + (" as baseline − probe (lower is better)" if lower_is_better else ""))
    if final <= 0:
        return Emergence(None, f"never: no gain over the baseline at the last step ({final:+.3f})")
    if final_gain is not None and not final_gain.distinguishable:
        return Emergence(None, f"never: final gain {format_interval(final_gain)}")
    fractions = tuple(g / final for g in gains)
    first = next(i for i, f in enumerate(fractions) if f >= fraction)   # the last step has fraction 1
    note = f"step {steps[first]}" + ("" if final_gain is not None else " (no interval for the final gain)")
    return Emergence(int(steps[first]), note, fractions)
