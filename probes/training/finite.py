"""Non-finite values in a batch: find where they come from and stop with an error that says so.

The probes must never turn a NaN into a plausible number: a NaN activation gives NaN losses, but a
NaN logit is never the argmax (Dice 1.5e-10) and a NaN map has no variance (Pearson 0.0), so the
metrics look like a bad probe rather than bad data. The modules detect a non-finite loss (or a
non-finite input, for the closed-form probes) per batch, at the cost of one check, and this module
then inspects the batch to name the sample, the prompt, the layer, the step and the file.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class NonFiniteError(ValueError):
    """NaN or infinite values reached a probe's loss, inputs or metrics."""


def describe_sample(dm: Any, index: int) -> str:
    """``sample 17 (train, seed 3: 'a photo of …')`` when the data module knows its prompts."""
    try:
        rec = dm.records()[index]
    except Exception:  # a module without prompts (tests, exports): the index alone
        return f"sample {index}"
    prompt = rec.prompt if len(rec.prompt) <= 60 else rec.prompt[:57] + "..."
    return f"sample {index} ({rec.split}, seed {rec.seed}: {prompt!r})"


def _store_files(dm: Any) -> tuple[str | None, dict[str, str]]:
    store = getattr(dm, "store", None)
    root = str(store.root) if store is not None else None
    labels = {t: str(c.path) for t, c in (getattr(dm, "label_caches", None) or {}).items()}
    return root, labels


def bad_inputs(batch: dict[str, Any], layers: Sequence[str], tasks: Sequence[str], steps: Sequence[int],
               dm: Any = None) -> list[str]:
    """One line per sample of ``batch`` whose activations or labels are not finite."""
    root, label_files = _store_files(dm)
    index = torch.as_tensor(batch["index"]).reshape(-1).tolist()
    lines = []
    for j, i in enumerate(index):
        parts = []
        for name in layers:
            a = batch["acts"][name][j]                                  # [S, T, C]
            ok = torch.isfinite(a.reshape(a.shape[0], -1)).all(-1)
            if not bool(ok.all()):
                bad_steps = [steps[s] for s in torch.nonzero(~ok).reshape(-1).tolist()]
                where = f" in {root}/acts/{name}.npy" if root else ""
                parts.append(f"activations of layer {name} at step(s) {bad_steps}{where}")
        for t in tasks:
            y = batch["labels"][t][j]
            if y.is_floating_point() and not bool(torch.isfinite(y).all()):
                where = f" in {label_files[t]}" if t in label_files else ""
                parts.append(f"labels of task {t!r}{where}")
        if parts:
            lines.append(f"{describe_sample(dm, int(i))}: non-finite " + "; ".join(parts))
    return lines


def raise_non_finite(what: str, split: str, heads: Sequence[tuple[str, str, int]], batch: dict[str, Any],
                     layers: Sequence[str], tasks: Sequence[str], steps: Sequence[int], dm: Any = None,
                     hint: str = "") -> None:
    """Raise :class:`NonFiniteError` for a ``split`` batch; ``heads`` are the (task, layer, step) affected."""
    shown = "; ".join(f"task {t}, layer {l}, step {s}" for t, l, s in heads[:3])
    more = f" (and {len(heads) - 3} more heads)" if len(heads) > 3 else ""
    head = f"non-finite {what} in a {split} batch: {shown}{more}." if heads else f"non-finite {what} in a {split} batch."
    causes = bad_inputs(batch, layers, tasks, steps, dm)
    if causes:
        root, label_files = _store_files(dm)
        redo = []
        if any("activations" in c for c in causes):
            redo.append(f"the store {root} (data.store_dir; regenerated on the next run)" if root else "the store")
        if any("labels of task" in c for c in causes):
            redo.append("the label cache folder named above (recomputed on the next run)")
        fix = "The data is corrupt: restore the named file(s), or delete " + " and ".join(redo) + "."
        body = "\n  ".join(causes[:5]) + (f"\n  ... and {len(causes) - 5} more samples" if len(causes) > 5 else "")
        raise NonFiniteError(f"{head}\n  {body}\n{fix}")
    raise NonFiniteError(f"{head} The inputs of this batch are finite, so the probes themselves diverged. "
                         f"{hint}".rstrip())


def non_finite_heads(losses: dict[tuple[str, str], Tensor], steps: Sequence[int]) -> list[tuple[str, str, int]]:
    """``{(task, layer): per-head values [..., S]}`` -> the (task, layer, step) heads with a non-finite value."""
    out = []
    for (t, layer), v in losses.items():
        ok = torch.isfinite(v.reshape(-1, v.shape[-1])).all(0)
        out += [(t, layer, steps[s]) for s in torch.nonzero(~ok).reshape(-1).tolist()]
    return out
