"""How much of a toy world's exact labels image position alone explains: the world's own bars.

Why: a probe that predicts depth or shading from a diffusion model's activations only shows
knowledge beyond position if position alone does badly. In the V1 world the camera never rolls
and the light is directional, so the per-pixel mean of training labels (the *prior map*) already
ranks a fresh render's depth and shading well; a world fit for probing must not allow that. The
Spearman ceiling also needs no large tied regions in the truth (a flat region lit by one
directional light has one shading value; any prediction breaks that tie), so the *tie ceiling*
scores the exact shading against itself plus invisible (1e-9) noise.

Bars (issue 20, on exact labels of the renderer alone): prior-map per-image Spearman <= 0.3 on
depth and on shading; shading tie ceiling >= 0.95.

Usage: ``python -m probes.toy.world_bars --train 600 --test 200 --world v2``
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from probes.toy.world import WORLDS, render_many, world_config

#: the issue's bars: (field, "max" or "min", threshold)
BARS: tuple[tuple[str, str, float], ...] = (
    ("prior_depth", "max", 0.3), ("prior_shading", "max", 0.3), ("tie_ceiling_shading", "min", 0.95))
#: scene seeds of the train and test renders: streams of their own, so the two never share a scene
TRAIN_SEED, TEST_SEED = 20_000, 20_001


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman of each row of ``a`` [N, P] with the same row of ``b`` (average ranks for ties,
    as :func:`scipy.stats.spearmanr`); NaN where a row is constant."""
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def prior_spearman(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-test-image Spearman of the train images' per-pixel mean with each test image."""
    prior = train.astype(np.float64).mean(0).reshape(1, -1)
    flat = test.reshape(len(test), -1)
    return spearman_rows(np.broadcast_to(prior, flat.shape), flat)


def tie_ceiling(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-image Spearman of the truth plus N(0, 1e-9) noise with the truth itself: what a
    perfect predictor scores when its output breaks the truth's ties."""
    flat = truth.reshape(len(truth), -1).astype(np.float64)
    jitter = np.random.default_rng(seed).normal(0.0, 1e-9, flat.shape)
    return spearman_rows(flat + jitter, flat)


def world_bars(world: str = "v2", train: int = 600, test: int = 200, size: int = 64,
               max_objects: int = 3) -> dict[str, float]:
    """The bars' measures (means over test images) for one world, and the object count."""
    cfg = world_config(world)
    keep = ("depth", "inv_depth", "shading")
    tr = render_many(train, TRAIN_SEED, size=size, max_objects=max_objects, fields=keep, world=cfg)
    te = render_many(test, TEST_SEED, size=size, max_objects=max_objects, fields=keep, world=cfg)
    out: dict[str, float] = {"train": float(train), "test": float(test)}
    for k in keep:
        out[f"prior_{k}"] = float(np.nanmean(prior_spearman(tr[k], te[k])))
    out["tie_ceiling_shading"] = float(np.nanmean(tie_ceiling(te["shading"])))
    out["tie_ceiling_depth"] = float(np.nanmean(tie_ceiling(te["depth"])))
    return out


def verdicts(measures: dict[str, float]) -> dict[str, bool]:
    """Which of :data:`BARS` the measures meet."""
    return {k: (measures[k] <= v if how == "max" else measures[k] >= v) for k, how, v in BARS}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="v2", choices=sorted(WORLDS))
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        raise SystemExit(f"--train and --test must be >= 1, got {args.train} and {args.test}")
    m = world_bars(args.world, args.train, args.test, args.size)
    met = verdicts(m)
    if args.json:
        print(json.dumps({**m, "met": met}))
    else:
        print(f"world {args.world}: {args.train} train / {args.test} test renders, {args.size} px")
        for k, v in m.items():
            if k in ("train", "test"):
                continue
            bar = next(((how, t) for b, how, t in BARS if b == k), None)
            note = "" if bar is None else f"  bar {'<=' if bar[0] == 'max' else '>='} {bar[1]}: " \
                                          f"{'met' if met[k] else 'NOT met'}"
            print(f"  {k:22s} {v:+.3f}{note}")
    return m


if __name__ == "__main__":
    main()
