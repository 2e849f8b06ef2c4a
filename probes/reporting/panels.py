"""Prediction panels: image | label | probe prediction at every step, for a few validation images.

Numbers say how well a probe does; a panel shows *what* it sees emerge as denoising proceeds.
For each task the layer is the one that scored best on validation. Activations come from the
store (cached mode) or from the copies the module kept while validating (streaming mode).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from probes.common.files import save_figure  # noqa: E402
from probes.reporting.markup import tick_timestep  # noqa: E402
from probes.tasks import get_task  # noqa: E402
from probes.training.heads import apply_probe, layer_key, to_label_units, token_map  # noqa: E402


def panel_indices(dm, k: int) -> list[int]:
    """The first ``k`` validation images (test images when there is no val split)."""
    ds = dm.datasets.get("val") or dm.datasets.get("test")
    return list(ds.indices[:k]) if ds is not None else []


def layer_acts(dm, index: int, layer: str, kept_acts: dict[int, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """``[S, T, C]`` conditional-half activations of one image and layer (``kept_acts``: streamed runs')."""
    kept = (kept_acts or {}).get(index)
    if kept is not None:
        return kept[layer].float()
    cond = dm.store.manifest["capture"]["halves"].index("cond")
    return torch.from_numpy(np.array(dm.store.activation(layer, index)[:, cond])).float()


@torch.no_grad()
def predict_maps(module, task: str, layer: str, acts: torch.Tensor) -> np.ndarray:
    """``[S, H, W]`` predictions in label units (0/1 for binary tasks) from ``acts [S, T, C]``."""
    spec, kind = module.spec, get_task(task).kind
    info = next(l for l in spec.layers if l.name == layer)
    bank = module.banks[task]
    w = bank.weight[layer_key(layer)].detach().cpu()                            # [S, C, out]
    b = bank.bias[layer_key(layer)].detach().cpu() if bank.bias is not None else None
    maps = token_map(apply_probe(acts, w, b), info.grid, spec.label_size)       # one image, its S steps
    return to_label_units(maps, kind, spec.target_stats.get(task)).float().numpy()


def build_panels(module, dm, best: list[dict], k: int = 4,
                 kept_acts: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, dict[str, Any]]:
    """Per task: indices, images, labels, predictions ``[K, S, H, W]``, and the layer used."""
    idx = panel_indices(dm, k)
    out: dict[str, dict[str, Any]] = {}
    for task in module.banks:
        primary = get_task(task).primary
        pick = [b for b in best if b["task"] == task and b["metric"] == primary]
        if not pick or not idx:
            continue
        layer = pick[0]["layer"]
        images = np.stack([np.asarray(dm.store.image(i)) for i in idx])
        labels = np.stack([np.asarray(dm.label_caches[task].array()[i]) for i in idx])
        if get_task(task).kind == "binary":
            labels = (labels > module.hparams.threshold).astype(np.float32)
        preds = np.stack([predict_maps(module, task, layer, layer_acts(dm, i, layer, kept_acts)) for i in idx])
        out[task] = {"indices": idx, "images": images, "labels": labels, "preds": preds, "layer": layer,
                     "steps": list(module.spec.steps), "timesteps": list(module.spec.timesteps)}
    return out


def plot_panel(task: str, panel: dict[str, Any], path: Path, max_steps: int = 8) -> Path:
    steps, ts = panel["steps"], panel["timesteps"]
    pick = np.unique(np.linspace(0, len(steps) - 1, min(max_steps, len(steps))).round().astype(int))
    k = len(panel["indices"])
    cols = 2 + len(pick)
    fig, axes = plt.subplots(k, cols, figsize=(1.6 * cols, 1.7 * k + 0.4), squeeze=False)
    binary = get_task(task).kind == "binary"
    cmap = "gray" if binary else "magma"
    for r in range(k):
        lab = panel["labels"][r]
        lo, hi = (0.0, 1.0) if binary else (float(np.percentile(lab, 1)), float(np.percentile(lab, 99)))
        axes[r, 0].imshow(panel["images"][r])
        axes[r, 1].imshow(lab, cmap=cmap, vmin=lo, vmax=hi)
        for c, si in enumerate(pick):
            axes[r, 2 + c].imshow(panel["preds"][r, si], cmap=cmap, vmin=lo, vmax=hi)
            if r == 0:
                axes[r, 2 + c].set_title(f"step {steps[si]}\nt={tick_timestep(ts[si])}", fontsize=8)
        axes[r, 0].set_ylabel(f"image {panel['indices'][r]}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
            axes[r, 1].set_title("label", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{task}: probe predictions on validation images, layer {panel['layer']} (best on val)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
