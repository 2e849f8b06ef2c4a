"""The protocol's baseline: the off-the-shelf labeler run on the image decoded at every step,
scored against the final image's labels with the probes' metrics.

The decoded latent is the store's (``generation.decode``): the noisy latent x_{t-1} as the 2024
replication (default), or the predicted x0. Rows use the pseudo-layer ``decoded_noisy`` or
``decoded_x0`` (``probes.metrics.baseline_rows``) so that metric-vs-step plots draw "probe vs
labeler on decoded images" in one figure and say which latent (the replication's claim: probes
from step ~3, labelers on the noisy latent only from step ~10).
"""
from __future__ import annotations

import numpy as np
import torch

from probes.metrics.baseline_rows import DECODED
from probes.metrics.exact import BlockTargets, HeadMetrics, task_scores
from probes.tasks import get_task


@torch.no_grad()
def decoded_rows(module, dm, split: str = "test", chunk: int = 4,
                 per_image: dict[str, tuple[list[int], np.ndarray]] | None = None) -> list[dict]:
    """Metric rows (pseudo-layer ``decoded_<latent>``) of the labeler on the decoded images of ``split``.

    :param per_image: if given, filled per task with ``(indices, scores [N, S, M])``: one score per image.
    """
    caches = getattr(dm, "decoded_label_caches", {})
    ds = dm.datasets.get(split)
    if not caches or ds is None:
        return []
    layer = DECODED[dm.store.decoded]
    spec, steps = module.spec, len(module.spec.steps)
    idx = list(ds.indices)
    h, w = spec.label_size
    rows = []
    for t in module.banks:
        if t not in caches:
            continue
        task = get_task(t)
        metric = HeadMetrics(list(task.metrics), steps, sync_on_compute=False)  # runs on rank 0 alone
        kept = []
        for k in range(0, len(idx), chunk):
            sel = idx[k:k + chunk]
            y = module.targets(task, torch.from_numpy(np.stack([np.asarray(dm.label_caches[t].array()[i]) for i in sel])))
            p = module.targets(task, torch.from_numpy(np.stack([np.asarray(caches[t].array()[i]) for i in sel])))
            q = p.reshape(len(sel), steps, h * w)                          # one "token" per pixel
            blocks = BlockTargets.build(y, (h, w), ranks=task.kind != "binary")
            vals = task_scores(task, q > 0.5 if task.kind == "binary" else q, blocks)
            metric.update(vals, slice(0, steps))
            kept.append(vals.cpu().numpy())
        values = metric.compute()
        if per_image is not None and kept:
            per_image[t] = (idx, np.concatenate(kept))
        for mi, name in enumerate(task.metrics):
            for si, step in enumerate(spec.steps):
                rows.append({"split": split, "task": t, "layer": layer, "step": step,
                             "timestep": spec.timesteps[si], "metric": name, "value": float(values[mi, si])})
    return rows
