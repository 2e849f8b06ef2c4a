"""What a finished test computed, gathered before anything is written.

The run's outputs callback (:mod:`.run_outputs`) only writes; every number and map it writes is
computed here, from the trained module, the data module and the run's other stages: the probes'
val/test rows, the labeler on decoded images and the position-only baseline
(:mod:`probes.metrics`), rows an experiment stage added (callbacks with ``result_rows``, e.g. the
classifier), the best heads picked on validation, the export (:func:`probes.export.probeset.build_export`,
with the stages' ``export_record``) and the prediction panels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from probes.export.probeset import ProbeExport, build_export
from probes.metrics.decoded import decoded_rows
from probes.metrics.position import position_rows
from probes.reporting.panels import build_panels
from probes.reporting.tables import best_heads


@dataclass
class RunResults:
    """Everything the outputs of one tested run are made of."""

    rows: list[dict]
    best: list[dict]
    summary: dict[str, Any]
    export: ProbeExport | None = None
    panels: dict[str, dict[str, Any]] = field(default_factory=dict)


def stage_rows(stages: Sequence[Any]) -> list[dict]:
    """Rows other stages of the run computed (``result_rows`` of callbacks such as the classifier)."""
    return [r for s in stages for r in (getattr(s, "result_rows", None) or [])]


def stage_records(stages: Sequence[Any]) -> dict[str, Any]:
    """What those stages ask the export to record (``export_record``), merged."""
    out: dict[str, Any] = {}
    for s in stages:
        out.update(getattr(s, "export_record", None) or {})
    return out


def collect_results(module: Any, dm: Any = None, stages: Sequence[Any] = (), export: bool = True,
                    panels: int = 0, panel_acts: dict[int, dict[str, Any]] | None = None) -> RunResults:
    """The rows, best heads, summary, export and panels of a tested ``module`` (see the module docstring).

    :param dm: the data module (None: only the module's own rows).
    :param stages: the run's other stages (the trainer's callbacks).
    :param panels: validation images per prediction panel (0: none).
    :param panel_acts: activations of the panel images kept while a streamed split went by.
    """
    rows = [r for split in ("val", "test") for r in module.results.get(split, [])]
    if dm is not None:
        rows += decoded_rows(module, dm)    # the labeler on decoded intermediate images, per step
        rows += stage_rows(stages)          # e.g. the classifier on the same images, per step
        rows += position_rows(module, dm)   # what pixel coordinates alone predict
    spec = module.spec
    best = best_heads(rows)
    summary = {"model": spec.model, "is_random": spec.is_random, "store_dir": spec.store_dir, "best": best,
               "num_probes": len(module.banks) * len(spec.layers) * len(spec.steps)}
    probes = build_export(module, extra={"best": best, **stage_records(stages)}) if export else None
    shown = {}
    if panels and dm is not None and getattr(dm, "store", None) is not None:
        shown = build_panels(module, dm, best, panels, panel_acts)
    return RunResults(rows, best, summary, probes, shown)
