"""One-pass closed-form probes, streaming generation, U-Net call counts, and DDP on 2 CPU processes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from probes.bench.planted import synthetic_datamodule, upsample_tokens
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import DiffusionSpec
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec, load_prompts
from probes.store.activations import ActivationStore
from probes.training.datamodule import ActivationDataModule
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule
from tests.conftest import REPO, reference_dir

A = LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=6, grid=(4, 4))
B = LayerInfo("mid.0", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=5, grid=(2, 2))
W = np.random.default_rng(1).normal(size=6)


def trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=kw.pop("max_epochs", 1), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def planted(tmp, noise=0.05):
    return synthetic_datamodule(
        tmp, n=40, layers=[A, B], steps=2, size=16, acts_fn=lambda rng, l: rng.normal(size=(2, l.tokens, l.channels)),
        label_fns={"depth": lambda a, rng: upsample_tokens(a["up3.0"][1] @ W, A.grid, 16) + noise * rng.normal(size=(16, 16)),
                   "foreground": lambda a, rng: upsample_tokens((a["up3.0"][1] @ W > 0).astype(float), A.grid, 16)})


def test_ridge_is_exact_least_squares(tmp_path):
    dm = planted(tmp_path)
    module = RidgeProbeModule(lambdas=[1e-12])
    trainer().fit(module, datamodule=dm)
    # reference: numpy least squares on the block-mean targets of the train images, z-scored
    store, train = dm.store, dm.datasets["train"].indices
    cache = dm.label_caches["depth"]
    X = np.concatenate([np.asarray(store.activation("up3.0", i)[0, 0], np.float64) for i in train])   # step 0
    raw = np.stack([np.asarray(cache.array()[i], np.float64) for i in train])
    mean, std = raw.mean(), raw.std()
    yb = ((raw - mean) / std).reshape(len(train), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(-1)
    w_ref = np.linalg.lstsq(X, yb, rcond=None)[0]
    w = module.banks["depth"].weight["up3_0"][0, :, 0].detach().double().numpy()
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6)
    assert module.spec.target_stats["depth"]["mean"] == pytest.approx(mean)


def test_ridge_recovers_planted_signal_and_picks_lambda_on_val(tmp_path):
    dm = planted(tmp_path)
    module = RidgeProbeModule()
    t = trainer()
    t.fit(module, datamodule=dm)
    t.test(module, datamodule=dm, verbose=False)
    res = {(r["task"], r["layer"], r["step"], r["metric"]): r["value"] for r in module.results["test"]}
    assert res[("depth", "up3.0", 1, "spearman")] > 0.97
    assert res[("foreground", "up3.0", 1, "dice")] > 0.85
    assert abs(res[("depth", "mid.0", 0, "spearman")]) < 0.3
    lam = [r for r in module.results["val"] if r["metric"] == "ridge_lambda"]
    assert len(lam) == 2 * 2 * 2 and all(r["value"] in module.hparams.lambdas for r in lam)



@pytest.mark.parametrize("kind", ["ridge", "sgd"])
def test_val_scores_reach_the_loggers_once_per_head(tmp_path, kind):
    """W&B's per-head curves: every validation score (and ridge's chosen λ) goes to each logger, in one call."""
    from pytorch_lightning.loggers.logger import Logger

    class Recording(Logger):
        name, version = "recording", 0
        calls: list = []

        def log_metrics(self, metrics, step=None):
            self.calls.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    dm = planted(tmp_path)
    module = RidgeProbeModule() if kind == "ridge" else ProbeModule(lr=0.01)
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=Recording(), enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=dm)
    val = [c for c in Recording.calls if "val/depth/spearman/up3.0/step_00" in c]   # not the per-task losses
    assert len(val) == 1
    rows = module.results["val"]
    expected = {f"val/{r['task']}/{r['metric']}/{r['layer']}/step_{r['step']:02d}": r["value"] for r in rows
                if r["metric"] != "loss"}
    assert len(expected) > 2 * 2 * 2 and val[0] == pytest.approx(expected)
    assert ("val/depth/ridge_lambda/up3.0/step_01" in val[0]) == (kind == "ridge")

def tiny_dm(tmp, mode, batch_size=1, **kw):
    return ActivationDataModule(
        diffusion=DiffusionSpec(source="random", architecture="tiny"),
        prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=4, val_fraction=0.3),
        generation=GenerationSpec(steps=3, batch_size=batch_size), capture=CaptureSpec(layers=["up3.0", "mid.0"]),
        labels={"depth": {"name": "vertical"}, "foreground": {"name": "otsu"}}, mode=mode,
        store_root=str(tmp), device="cpu", progress=False, **kw)


def test_streaming_ridge_equals_cached_ridge_and_caches_nothing(tmp_path):
    """Same images (batch size 1: bitwise-identical generation) -> the same probes, without an activation cache."""
    out = {}
    for mode in ("cached", "streaming"):
        dm = tiny_dm(tmp_path / mode, mode)
        module = RidgeProbeModule(lambdas=[1e-3, 1e-1])
        t = trainer()
        t.fit(module, datamodule=dm)
        t.test(module, datamodule=dm, verbose=False)
        out[mode] = (module, dm)
    (mc, dmc), (ms, dms) = out["cached"], out["streaming"]
    for task in mc.banks:
        for key, w in mc.banks[task].weight.items():
            torch.testing.assert_close(ms.banks[task].weight[key], w, atol=1e-5, rtol=1e-5)
    assert dms.store.layer_names == [] and not (dms.store.root / "acts").exists()
    assert dms.store.missing() == []                      # images (and labels) are kept, activations are not
    n = dms.store.num_samples
    assert dms.guided_calls == n * 3                      # every image generated exactly once (3 steps)
    assert dms.store.guided_calls() == dmc.store.guided_calls() == n * 3


def test_sgd_probes_refuse_streamed_data(tmp_path):
    dm = tiny_dm(tmp_path, "streaming")
    with pytest.raises(ValueError, match="RidgeProbeModule"):
        trainer().fit(ProbeModule(), datamodule=dm)


def test_one_generation_pass_for_the_reference_experiment():
    """617 prompts x 15 K-LMS steps = 9,255 guided calls for all tasks, layers and steps together."""
    recs = load_prompts(PromptSpec(source="chen2023", local_dir=str(reference_dir("chen2023"))))
    assert len(recs) * GenerationSpec().steps == 9255


def ddp(*args, tmp):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "train.py", "fit", *args, "--trainer.strategy", "ddp",
                           "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                           "--data.store_root", str(tmp / "stores")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def rows(path):
    return {tuple(r[k] for k in ("split", "task", "layer", "step", "metric")): float(r["value"])
            for r in csv.DictReader(open(path))}


@pytest.mark.slow
def test_ddp_two_processes_share_one_store_and_reduce_metrics_exactly(tmp_path):
    ddp("--config", "configs/tiny.yaml", "--trainer.devices", "2", "--trainer.max_epochs", "1",
        "--data.prompts.limit", "5", "--data.capture.layers", '["up3.*", "mid.0"]', "--run_dir", str(tmp_path / "run"),
        tmp=tmp_path)
    store = ActivationStore(next((tmp_path / "stores").iterdir()))
    assert store.missing() == []
    ranks = {json.loads(p.read_text())["rank"] for p in (store.root / "commits").glob("*.json")}
    assert ranks == {0, 1}                                # both ranks generated a disjoint shard
    # evaluating the exported probes in one process gives the DDP run's test metrics: no sample
    # was repeated or dropped, and the sums were all-reduced
    from probes.cli.evaluate import evaluate

    evaluate(tmp_path / "run" / "probes", out=tmp_path / "eval", store_root=str(tmp_path / "stores"), accelerator="cpu",
             plots=False)
    ddp_rows, one = rows(tmp_path / "run" / "metrics.csv"), rows(tmp_path / "eval" / "metrics.csv")
    test_keys = [k for k in ddp_rows if k[0] == "test"]
    assert test_keys and max(abs(ddp_rows[k] - one[k]) for k in test_keys) < 1e-6  # float32 batching noise only


@pytest.mark.slow
def test_ddp_ridge_equals_single_process_ridge(tmp_path):
    common = ["--config", "configs/tiny.yaml", "--model", "configs/model/ridge.yaml", "--trainer.max_epochs", "1",
              "--data.prompts.limit", "5", "--data.capture.layers", '["up3.0", "mid.0"]']
    ddp(*common, "--trainer.devices", "1", "--run_dir", str(tmp_path / "one"), tmp=tmp_path)
    ddp(*common, "--trainer.devices", "2", "--run_dir", str(tmp_path / "two"), tmp=tmp_path)  # same store
    a = load_file(str(tmp_path / "one" / "probes" / "probes.safetensors"))
    b = load_file(str(tmp_path / "two" / "probes" / "probes.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bench_script_runs_quick(tmp_path):
    """`make bench`'s script end to end at toy sizes (its figures are not checked: no timing asserts)."""
    from probes.cli.main import main

    out = tmp_path / "B.md"
    main(["bench", "--quick", "true", "--out", str(out), "--workdir", str(tmp_path / "w")])
    text = out.read_text()
    for section in ("## 1. Capture overhead", "## 2. Probe bank", "## 3. Store read", "## 4. Streaming ridge",
                    "## 5. The whole experiment next to plain generation", "## 6. Torch threads",
                    "## 7. SD v1.4 architecture on the GPU", "## 8. Projection"):
        assert section in text
    assert "max weight difference" in text
    assert "a projection from FLOP counts, not a measurement" in text
