"""An export rebuilds the module that trained it: SGD, ridge and mean-difference probes come back as
their own class, with their settings, weights and biases, and test to the same numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from probes.bench.planted import planted_datamodule
from probes.export.probeset import export_probes
from probes.export.rebuild import module_class, module_from_export
from probes.training.mean_difference import MeanDifferenceProbeModule
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule

KINDS = {
    "sgd": lambda: ProbeModule(lr=5e-3, huber_delta=0.5, threshold=0.0, selection="best_val"),
    "ridge": lambda: RidgeProbeModule(lambdas=(1e-4, 1e-2), threshold=0.0),
    "mean_difference": lambda: MeanDifferenceProbeModule(threshold=0.0),
}


def trainer(epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def scores_of(module) -> dict:
    return {(r["task"], r["layer"], r["step"], r["metric"]): r["value"] for r in module.results["test"]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_export_rebuilds_the_module_that_trained_it(tmp_path, kind):
    dm = planted_datamodule(tmp_path / "data", n=24)
    module = KINDS[kind]()
    trainer(3 if kind == "sgd" else 1).fit(module, datamodule=dm)
    trainer().test(module, datamodule=dm, verbose=False)
    export = export_probes(module, tmp_path / "probes")
    assert json.loads((export / "probes.json").read_text())["module_class"] == \
        f"{type(module).__module__}.{type(module).__qualname__}"

    back = module_from_export(export)
    assert type(back) is type(module) and back.restored
    for key in ("tasks", "threshold", "bias", "huber_delta", "selection", "lambdas"):
        if key in module.hparams:
            assert back.hparams[key] == module.hparams[key] or list(back.hparams[key]) == list(module.hparams[key])
    for t, bank in module.banks.items():
        for name, w in bank.weight.items():
            torch.testing.assert_close(back.banks[t].weight[name], w.detach())
        assert (bank.bias is None) == (back.banks[t].bias is None)
        if bank.bias is not None:
            for name, b in bank.bias.items():
                torch.testing.assert_close(back.banks[t].bias[name], b.detach())

    # the rebuilt module validates (ridge: scores its fitted bank, no λ grid to search) and tests alike
    run = trainer()
    run.validate(back, datamodule=dm, verbose=False)
    run.test(back, datamodule=dm, verbose=False)
    before, after = scores_of(module), scores_of(back)
    assert before.keys() == after.keys()
    np.testing.assert_allclose([after[k] for k in before], [before[k] for k in before], rtol=1e-5, atol=1e-6)


def test_an_export_names_only_probe_modules_of_this_package():
    assert module_class("probes.training.ridge.RidgeProbeModule") is RidgeProbeModule
    with pytest.raises(ValueError, match="not one of this package's"):
        module_class("os.system")
    with pytest.raises(ValueError, match="not a ProbeModule"):
        module_class("probes.training.heads.ProbeBank")
    with pytest.raises(ValueError, match="does not exist in this version"):
        module_class("probes.training.ridge.NoSuchModule")
