"""Back from an export to a Lightning module: the kind of module that trained the probes, with its settings.

Why the same kind: the module decides how a bank is scored and selected (a ridge module keeps
its λ grid and threshold, a mean-difference module its biases), and an export is tested, evaluated
on another store, or fitted further with the module it came from. The class is read from the
export (``module_class``; exports written before that field name it in their hyper-parameters'
``_class_path``, or were plain SGD probes) and must be a ``ProbeModule``: an export is data, and
a class path in it is never imported unless it names one of those.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from probes.export.probeset import load_probes, probe_key
from probes.training.heads import layer_key
from probes.training.module import ProbeModule

DEFAULT_MODULE = "probes.training.module.ProbeModule"


def module_class(path: str) -> type[ProbeModule]:
    """The ``ProbeModule`` subclass at import path ``path``; anything else is refused."""
    name, _, attr = path.rpartition(".")
    if not name.startswith("probes."):
        raise ValueError(f"the export names the probe module {path!r}, which is not one of this package's "
                         f"(probes.training.*); refusing to import it")
    try:
        cls = getattr(importlib.import_module(name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"the export names the probe module {path!r}, which does not exist in this version "
                         f"({err}); re-export the probes with this version") from err
    if not (isinstance(cls, type) and issubclass(cls, ProbeModule)):
        raise ValueError(f"the export names {path!r} as its probe module, which is not a ProbeModule")
    return cls


def module_from_export(path: str | Path) -> ProbeModule:
    """The module that trained the exported probes (same class and settings), holding their
    weights and biases, ready for ``Trainer.test`` (or ``validate``)."""
    probes = load_probes(path)
    hparams = dict(probes.meta.get("hparams", {}))
    cls = module_class(str(probes.meta.get("module_class") or hparams.get("_class_path") or DEFAULT_MODULE))
    allowed = inspect.signature(cls.__init__).parameters
    module = cls(**{k: v for k, v in hparams.items() if k in allowed})
    module.build(probes.spec)
    with torch.no_grad():
        for t, bank in module.banks.items():
            for layer in module.spec.layers:
                keys = [probe_key(t, layer.name, s) for s in module.spec.steps]
                bank.weight[layer_key(layer.name)].copy_(torch.stack([probes.tensors[f"{k}/weight"] for k in keys]))
                if bank.bias is not None:
                    bank.bias[layer_key(layer.name)].copy_(torch.stack([probes.tensors[f"{k}/bias"] for k in keys]))
    module.restored = True
    return module
