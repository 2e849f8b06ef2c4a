"""Rows of ``metrics.csv`` that are not probes: their pseudo-layer names, and how people read them.

The labeler (and the classifier) run on intermediate images decoded from one of two latents, and
the two give different curves (the predicted x0 looks clean from the first steps, the noisy latent
x_{t-1} does not), so the pseudo-layer names which latent: a plot or table never leaves it implicit.
Kept free of heavy imports: the reporting code reads these names without loading torch.
"""
from __future__ import annotations

#: the task's labeler on the decoded image, per decoded latent (``generation.decode``)
DECODED = {"noisy": "decoded_noisy", "x0": "decoded_x0"}
#: the classifier on the decoded image, per decoded latent; its rows have the task ``CLASSIFICATION``
CLASSIFIER = {"noisy": "classifier_noisy", "x0": "classifier_x0"}
#: the ``task`` column of classifier rows (metrics ``top1``, ``top5``, ``prob``)
CLASSIFICATION = "classification"
#: the position baselines (``probes.metrics.prior_map``): the per-pixel mean of the train labels (the
#: headline "position" baseline) and the least-squares plane in pixel coordinates (a weaker second one)
PRIOR, PLANE = "prior", "plane"
POSITION_BASELINES = (PRIOR, PLANE)

LATENT_WORDS = {"noisy": "decoded noisy latent x_{t-1}", "x0": "decoded predicted x0"}
#: how each pseudo-layer is named in plots, tables, the report and the bench
DESCRIPTIONS = {
    **{name: f"labeler on {LATENT_WORDS[latent]}" for latent, name in DECODED.items()},
    **{name: f"classifier on {LATENT_WORDS[latent]}" for latent, name in CLASSIFIER.items()},
    PRIOR: "prior map: mean train label per pixel (position baseline)",
    PLANE: "plane in pixel coordinates (weaker position baseline)",
}
NOT_PROBES = frozenset(DESCRIPTIONS)


def describe(layer: str) -> str:
    """A pseudo-layer as a reader should see it (a probe layer is returned unchanged)."""
    return DESCRIPTIONS.get(layer, layer)


def is_position(layer: str) -> bool:
    """Whether ``layer`` is a position baseline (the prior map or the plane)."""
    return layer in POSITION_BASELINES


def is_decoded(layer: str) -> bool:
    """Whether ``layer`` is the labeler-on-decoded-images baseline (either latent)."""
    return layer in DECODED.values()


def latent_of(layer: str) -> str | None:
    """``noisy`` or ``x0`` for a decoded or classifier pseudo-layer, else None."""
    for table in (DECODED, CLASSIFIER):
        for latent, name in table.items():
            if name == layer:
                return latent
    return None
