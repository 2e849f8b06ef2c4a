"""The protocol's baseline: the off-the-shelf labeler run on the image decoded from the predicted
x0 at every step, scored against the final image's labels with the probes' metrics.

Rows use the pseudo-layer ``decoded_x0`` so that metric-vs-step plots draw "probe vs labeler on
decoded images" in one figure (the replication's claim: probes from step ~3, labelers only from
step ~10).
"""
from __future__ import annotations

import numpy as np
import torch

from probes.metrics.exact import BlockTargets, HeadMetrics, task_scores
from probes.tasks import get_task

DECODED = "decoded_x0"


@torch.no_grad()
def decoded_rows(module, dm, split: str = "test", chunk: int = 4) -> list[dict]:
    caches = getattr(dm, "x0_label_caches", {})
    ds = dm.datasets.get(split)
    if not caches or ds is None:
        return []
    spec, steps = module.spec, len(module.spec.steps)
    idx = list(ds.indices)
    h, w = spec.label_size
    rows = []
    for t in module.banks:
        if t not in caches:
            continue
        task = get_task(t)
        metric = HeadMetrics(list(task.metrics), steps, sync_on_compute=False)  # runs on rank 0 alone
        for k in range(0, len(idx), chunk):
            sel = idx[k:k + chunk]
            y = module.targets(task, torch.from_numpy(np.stack([np.asarray(dm.label_caches[t].array()[i]) for i in sel])))
            p = module.targets(task, torch.from_numpy(np.stack([np.asarray(caches[t].array()[i]) for i in sel])))
            q = p.reshape(len(sel), steps, h * w)                          # one "token" per pixel
            blocks = BlockTargets.build(y, (h, w), ranks=task.kind != "binary")
            vals = task_scores(task, q > 0.5 if task.kind == "binary" else q, blocks)
            metric.update(vals, slice(0, steps))
        values = metric.compute()
        for mi, name in enumerate(task.metrics):
            for si, step in enumerate(spec.steps):
                rows.append({"split": split, "task": t, "layer": DECODED, "step": step,
                             "timestep": spec.timesteps[si], "metric": name, "value": float(values[mi, si])})
    return rows
