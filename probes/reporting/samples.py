"""A grid of a run's generated images under their captions: what the numbers were measured on.

Why: a table saying "the control names the shape in 25 % of its samples" means little until one
sees that those samples are noise; the demo's report shows every image-generating run's first test
samples beside its sample-quality row.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probes.common.files import save_figure  # noqa: E402


def write_sample_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, title: str,
                      columns: int = 8) -> Path:
    """``images`` (uint8 ``[H, W, 3]``) in rows of ``columns``, each under its caption (wrapped), one title."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"one caption per image and at least one image: {len(images)} images, "
                         f"{len(captions)} captions")
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.95 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(np.asarray(images[k]), interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[k], 22)[:3]), fontsize=6)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def store_sample_grid(store, path: Path, title: str, n: int = 8, split: str = "test") -> Path:
    """The first ``n`` committed ``split`` samples of an activation store, under their prompts."""
    prompts = store.manifest.get("prompts") or []
    done = store.committed()
    idx = [i for i, p in enumerate(prompts) if p.get("split") == split and i < len(done) and done[i]][:n]
    if not idx:
        raise ValueError(f"the store at {store.root} has no committed {split} samples to show")
    return write_sample_grid([np.asarray(store.image(i)) for i in idx], [prompts[i]["prompt"] for i in idx],
                             path, title)
