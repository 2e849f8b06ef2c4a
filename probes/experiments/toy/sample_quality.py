"""Do the toy model's samples show what their captions say? Measured with the toy world's own models.

Generated images have no ground truth, so three questions are answered from the image alone and
compared with the caption (issue 20's sample-quality bars):

* ``shape_named`` (one-object captions): the toy classifier's most confident shape is the
  caption's shape.
* ``colour_named`` (one-object captions): the palette colour most of the object's pixels show is
  the caption's colour. Object pixels are those the foreground labeler marks (probability > 0.5)
  that are also chromatic; each votes for the palette colour whose RGB direction is nearest. Why
  the RGB direction: a render is ``albedo * shading`` with white lights, so shading scales a
  pixel's RGB vector and leaves its direction (chromaticity) unchanged; the nearest palette colour
  in full CIELAB confuses a shaded orange with red (71 % of the objects of 512 validation renders
  right, against 100 % by direction), and the hue angle in CIELAB does no better than the direction.
* ``relation_holds`` (two-object captions with two different colours): both caption colours
  are found (>= :data:`MIN_OBJECT_PIXELS` voting pixels each) and the left one's mean column is left
  of the right one's: "to the left of" as the image shows it, which is how world V2's captions are
  written. Captions naming one colour twice are left out (colour cannot tell the objects apart).

Every rate comes with a Clopper-Pearson 95 % interval (``scipy.stats.binomtest``) and a chance
rate: ``shape`` and ``colour``: the score of every image against every *other* image's caption
(the permutation chance, which accounts for a model that always draws the commonest shape);
``relation``: half the share of scenes in which both colours are found (objects drawn with the
right colours at random sides). ``object_found`` (no chance rate) and ``class_named`` (the top shape is one any
object of the caption has) are kept for continuity but are not quality bars: a random-weight
control passes ``object_found`` on 100 % of its images, because any blob is foreground.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

from probes.labels.toy_nets import predict
from probes.reporting.markup import fmt_percent, table
from probes.toy.world import COLOURS, PALETTE, SHAPES

#: a generated scene "has an object" (or a colour) when at least this many pixels show it
MIN_OBJECT_PIXELS = 8
#: a pixel votes for a colour only if ``(max - min) / max`` of its RGB reaches this: the ground and
#: the wall are grey (saturation <= 0.03), every palette colour has >= 0.69
MIN_SATURATION = 0.25
#: ... and if its brightest channel reaches this (of 255): near black, a few levels of rounding or
#: decoder error swing the ratio of the channels, so the hue of such a pixel says little
MIN_BRIGHTNESS = 20

_OBJECT = re.compile(r"^an? (\w+) (\w+)$")
_PALETTE_DIRS = np.array([PALETTE[c] for c in COLOURS], np.float64)
_PALETTE_DIRS /= np.linalg.norm(_PALETTE_DIRS, axis=1, keepdims=True)


def parse_caption(caption: str) -> list[tuple[str, str]] | None:
    """``[(colour, shape), ...]`` left to right, or None if the caption is not the world's."""
    parts = caption.strip().split(" to the left of ")
    out = []
    for part in parts:
        m = _OBJECT.match(part.strip())
        if m is None or m.group(1) not in PALETTE or m.group(2) not in SHAPES:
            return None
        out.append((m.group(1), m.group(2)))
    return out


def caption_classes(caption: str) -> set[int]:
    """Indices (into SHAPES) of the shapes a caption names."""
    words = caption.replace(",", " ").split()
    return {k for k, s in enumerate(SHAPES) if s in words}


def pixel_colours(images: np.ndarray) -> np.ndarray:
    """[N, H, W] int: the palette index (into COLOURS) of each pixel's nearest RGB direction, -1
    where the pixel is too grey or too dark to carry a hue."""
    x = np.asarray(images, np.float64)
    hi, lo = x.max(-1), x.min(-1)
    chromatic = (hi >= MIN_BRIGHTNESS) & ((hi - lo) >= MIN_SATURATION * np.maximum(hi, 1e-9))
    dirs = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
    best = (dirs @ _PALETTE_DIRS.T).argmax(-1)
    return np.where(chromatic, best, -1)


def colour_layout(images: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and palette colour: how many foreground pixels vote for it ([N, 6]) and their
    mean column ([N, 6], NaN where none)."""
    votes = np.where(foreground, pixel_colours(images), -1)
    cols = np.broadcast_to(np.arange(votes.shape[2]), votes.shape)
    counts = np.stack([(votes == k).sum((1, 2)) for k in range(len(COLOURS))], 1)
    sums = np.stack([np.where(votes == k, cols, 0).sum((1, 2)) for k in range(len(COLOURS))], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_col = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return counts, mean_col


@dataclass(frozen=True)
class Rate:
    """A share of scenes with its Clopper-Pearson 95 % interval and chance rate."""

    hits: int
    n: int
    rate: float
    low: float
    high: float
    chance: float

    @classmethod
    def of(cls, hits: np.ndarray, chance: float) -> Rate:
        k, n = int(np.sum(hits)), int(np.size(hits))
        if n == 0:
            return cls(0, 0, float("nan"), float("nan"), float("nan"), float(chance))
        ci = binomtest(k, n).proportion_ci(0.95)
        return cls(k, n, k / n, float(ci.low), float(ci.high), float(chance))


def _permutation_chance(match: np.ndarray) -> float:
    """Mean of an [N, N] image-by-caption match table off its diagonal: the score when captions are
    independent of images."""
    n = len(match)
    if n < 2:
        return float("nan")
    return float((match.sum() - np.trace(match)) / (n * (n - 1)))


def measures(images: np.ndarray, captions: list[str], weights_dir=None) -> dict[str, Rate]:
    """``shape_named``, ``colour_named``, ``relation_holds`` (module docstring), plus
    ``object_found`` and ``class_named`` over every image (chance: the permutation chance)."""
    images = np.asarray(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image")
    parsed = [parse_caption(c) for c in captions]
    fg = predict("foreground", images, weights_dir) > 0.5
    probs = predict("classifier", images, weights_dir)
    top = probs.argmax(1)
    counts, mean_col = colour_layout(images, fg)
    found = fg.reshape(len(images), -1).sum(1) >= MIN_OBJECT_PIXELS
    named_sets = [caption_classes(c) for c in captions]
    class_named = np.array([int(t) in s for t, s in zip(top, named_sets)], bool)
    class_table = np.array([[int(t) in s for s in named_sets] for t in top], float)

    one = np.array([p is not None and len(p) == 1 for p in parsed])
    cap_shape = np.array([SHAPES.index(p[0][1]) if p and len(p) == 1 else -1 for p in parsed])
    cap_colour = np.array([COLOURS.index(p[0][0]) if p and len(p) == 1 else -1 for p in parsed])
    drawn_colour = np.where(counts.max(1) >= MIN_OBJECT_PIXELS, counts.argmax(1), -1)
    shape_hit = top[one] == cap_shape[one]
    colour_hit = drawn_colour[one] == cap_colour[one]

    two = np.array([p is not None and len(p) == 2 and p[0][0] != p[1][0] for p in parsed])
    pairs = [(COLOURS.index(p[0][0]), COLOURS.index(p[1][0])) for p, t in zip(parsed, two) if t]
    rows = np.nonzero(two)[0]
    both = np.array([counts[i, a] >= MIN_OBJECT_PIXELS and counts[i, b] >= MIN_OBJECT_PIXELS
                     for i, (a, b) in zip(rows, pairs)], bool)
    holds = np.array([bool(f) and mean_col[i, a] < mean_col[i, b]
                      for i, (a, b), f in zip(rows, pairs, both)], bool)
    return {
        "shape_named": Rate.of(shape_hit, _permutation_chance(
            (top[one][:, None] == cap_shape[one][None, :]).astype(float))),
        "colour_named": Rate.of(colour_hit, _permutation_chance(
            (drawn_colour[one][:, None] == cap_colour[one][None, :]).astype(float))),
        "relation_holds": Rate.of(holds, 0.5 * float(both.mean()) if both.size else float("nan")),
        "object_found": Rate.of(found, float("nan")),      # no chance rate: not a bar
        "class_named": Rate.of(class_named, _permutation_chance(class_table)),
    }


def sample_quality(images: np.ndarray, captions: list[str], weights_dir=None) -> dict[str, float]:
    """:func:`measures` flattened for JSON: ``images``, then per measure its rate (under its own
    name, as before) and ``<name>_n``, ``_low``, ``_high``, ``_chance``."""
    out: dict[str, float] = {"images": float(len(images))}
    for name, r in measures(images, captions, weights_dir).items():
        d = asdict(r)
        out[name] = d.pop("rate")
        d.pop("hits")
        out.update({f"{name}_{k}": float(v) for k, v in d.items()})
    return out


#: issue 20's bars for the toy model's samples
BARS = {"shape_named": 0.90, "colour_named": 0.90, "relation_holds": 0.75}
COLUMNS = {"shape_named": "shape named (1 object)", "colour_named": "colour named (1 object)",
           "relation_holds": "left/right holds (2 objects)"}
BARS_NOTE = ("Bars (issue 20): " + ", ".join(f"{COLUMNS[k]} >= {v:.0%}" for k, v in BARS.items())
             + ". Each cell: rate [95 % Clopper-Pearson interval] of n scenes, and the chance rate "
               "(shape, colour: every image against every other image's caption; left/right: half "
               "the scenes in which both colours were found).")


def rate_cell(q: dict[str, float], name: str) -> str:
    """One measure of a :func:`sample_quality` dict: rate [low, high] of n, chance."""
    if q.get(f"{name}_n", 0) == 0:
        return "no such captions"
    return (f"{fmt_percent(q[name])} [{fmt_percent(q[name + '_low'])}, {fmt_percent(q[name + '_high'])}] of "
            f"{int(q[name + '_n'])}, chance {fmt_percent(q[name + '_chance'])}")


def quality_table(qualities: dict[str, dict[str, float]]) -> tuple[str, str]:
    """:func:`sample_quality` results, one row per model (e.g. the model and its control), as
    Markdown and HTML (:func:`probes.reporting.markup.table`)."""
    return table(["model", *COLUMNS.values()],
                 [[label, *[rate_cell(q, name) for name in BARS]] for label, q in qualities.items()])


def quality_markdown(qualities: dict[str, dict[str, float]]) -> str:
    """:func:`quality_table`'s Markdown, then what the cells and bars mean."""
    return "\n".join([quality_table(qualities)[0], "", BARS_NOTE])


def store_sample_quality(store, indices=None, weights_dir=None) -> dict[str, float]:
    """The same, for the (committed) images of an activation store."""
    idx = sorted(store.commits.done()) if indices is None else list(indices)
    images = np.stack([np.asarray(store.image(i)) for i in idx])
    prompts = [store.manifest["prompts"][i]["prompt"] for i in idx]
    return sample_quality(images, prompts, weights_dir)
