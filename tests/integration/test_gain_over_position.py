"""The gain over position on planted stores: exactly 0 when the labels are a pure function of the pixel's
position, clearly positive when they follow a planted activation direction, for ridge (one pass) and SGD
probes alike; the prior map equals a direct numpy mean of the train labels."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl

from probes.bench.planted import synthetic_datamodule, upsample_tokens
from probes.diffusion.layers import LayerInfo
from probes.metrics.bootstrap import difference_interval
from probes.metrics.prior_map import PLANE, PRIOR
from probes.reporting.results import collect_results
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule

A = LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=8, grid=(4, 4))
B = LayerInfo("mid.0", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", channels=6, grid=(2, 2))
SIZE, STEPS = 16, 2
RNG = np.random.default_rng(5)
DEPTH_MAP = RNG.normal(size=(SIZE, SIZE))                    # distinct values: no rank ties
SHADING_MAP = RNG.normal(size=(SIZE, SIZE))
MASK = (np.add.outer(np.arange(SIZE), np.arange(SIZE)) > SIZE).astype(float)
W_DEPTH = np.random.default_rng(10).normal(size=8)
W_FG = np.random.default_rng(11).normal(size=8)


def acts(rng, layer):
    """Activations that also carry position (as U-Net features do): a fixed per-token pattern plus noise."""
    pattern = np.random.default_rng(layer.channels).normal(size=(layer.tokens, layer.channels))
    return pattern + rng.normal(size=(STEPS, layer.tokens, layer.channels))


POSITION_ONLY = {
    "depth": lambda a, rng: DEPTH_MAP,
    "foreground": lambda a, rng: MASK,
    "shading": lambda a, rng: SHADING_MAP,
}
PLANTED = {   # position plus a planted direction of layer up3.0 at step 1
    "depth": lambda a, rng: DEPTH_MAP + 2 * upsample_tokens(a["up3.0"][1] @ W_DEPTH, A.grid, SIZE),
    "foreground": lambda a, rng: np.maximum(MASK, upsample_tokens((a["up3.0"][1] @ W_FG > 1).astype(float), A.grid,
                                                                  SIZE)),
    "shading": lambda a, rng: SHADING_MAP + upsample_tokens(a["up3.0"][1] @ W_DEPTH, A.grid, SIZE),
}


def run(root, labels, module):
    pl.seed_everything(0)
    dm = synthetic_datamodule(root, n=40, layers=[A, B], steps=STEPS, size=SIZE, acts_fn=acts, label_fns=labels)
    epochs = 1 if module.one_pass else 30
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return module, dm, collect_results(module, dm, export=False)


def gains(results, split="test"):
    return {(r["task"], r["layer"], r["step"], r["metric"]): r["gain"] for r in results.rows
            if r["split"] == split and "gain" in r}


@pytest.fixture(scope="module")
def ridge_position(tmp_path_factory):
    return run(tmp_path_factory.mktemp("position"), POSITION_ONLY, RidgeProbeModule())


def test_prior_map_is_the_numpy_mean_of_the_train_labels(ridge_position):
    module, dm, _ = ridge_position
    train = list(dm.datasets["train"].indices)
    for t in ("depth", "foreground", "shading"):
        raw = np.stack([np.asarray(dm.label_caches[t].array()[i], dtype=np.float64) for i in train])
        target = (raw > 0).astype(float) if t == "foreground" else \
            (raw - module.spec.target_stats[t]["mean"]) / module.spec.target_stats[t]["std"]
        np.testing.assert_allclose(module.position[t][PRIOR].map, target.mean(0), rtol=1e-9, atol=1e-12)


def test_position_only_labels_give_zero_gain_for_ridge_heads(ridge_position):
    _, _, results = ridge_position
    for split in ("val", "test"):
        g = gains(results, split)
        assert len(g) == 3 * 2 * STEPS + 2 * 2 * 2 * STEPS          # dice; spearman, pearson, rmse of two tasks
        assert max(abs(v) for v in g.values()) < 1e-6, sorted(g.items(), key=lambda kv: -abs(kv[1]))[:3]


def test_position_rows_and_per_image_scores(ridge_position):
    module, _, results = ridge_position
    layers = {r["layer"] for r in results.rows}
    assert {PRIOR, PLANE} <= layers and "position" not in layers
    pi = results.per_image
    assert pi is not None and pi.index.size == len(results.rows and []) + 10   # 25 % of 40 images are test
    prior_test = [r["value"] for r in results.rows if r["layer"] == PRIOR and r["split"] == "test"
                  and r["task"] == "depth" and r["metric"] == "spearman"][0]
    assert pi.baseline("depth", "spearman", PRIOR).mean() == pytest.approx(prior_test, rel=1e-9)
    # the per-image scores of every head average to metrics.csv's value
    for r in results.rows:
        if r["split"] == "test" and r["layer"] in ("up3.0", "mid.0") and r["metric"] != "loss":
            assert pi.head(r["task"], r["metric"], r["layer"], r["step"]).mean() == pytest.approx(r["value"], rel=1e-5,
                                                                                                   abs=1e-6)
            assert pi.head(r["task"], r["metric"], r["layer"], r["step"], "with_prior").mean() == pytest.approx(
                r["with_prior"], rel=1e-5, abs=1e-6)


def check_planted(results):
    """The gain is clearly positive where the planted signal is (its paired interval excludes 0; the prior
    already explains ~0.85 of each score, the rest is the most there is to gain), and ~0 where it is not;
    the head on top of the prior is never worse than the activations alone."""
    g = gains(results)
    pi = results.per_image
    for task, metric, least in (("depth", "spearman", 0.1), ("shading", "spearman", 0.08), ("foreground", "dice", 0.04)):
        assert g[(task, "up3.0", 1, metric)] > least, (task, g[(task, "up3.0", 1, metric)])
        iv = difference_interval(pi.head(task, metric, "up3.0", 1, "with_prior"), pi.baseline(task, metric, PRIOR),
                                 resamples=2000)
        assert iv.distinguishable and iv.low > 0, (task, iv)
        row = next(r for r in results.rows if r["split"] == "test" and r["task"] == task and r["layer"] == "up3.0"
                   and r["step"] == 1 and r["metric"] == metric)
        assert row["with_prior"] > row["value"] - 0.01
        for layer, step in (("mid.0", 0), ("mid.0", 1), ("up3.0", 0)):
            assert abs(g[(task, layer, step, metric)]) < 0.03, (task, layer, step, g[(task, layer, step, metric)])


def test_planted_labels_give_a_clear_gain_where_the_signal_is(tmp_path):
    check_planted(run(tmp_path, PLANTED, RidgeProbeModule())[2])


def test_sgd_gain_heads_train_on_top_of_the_prior(tmp_path):
    """SGD heads with the prior as an extra input (weight initialised to 1): no gain on position-only labels
    (they start random and only approach w = 0), and the same clear gain as ridge on the planted signal."""
    _, _, flat = run(tmp_path / "position", POSITION_ONLY, ProbeModule(lr=0.05))
    assert max(abs(v) for v in gains(flat).values()) < 0.03
    check_planted(run(tmp_path / "planted", PLANTED, ProbeModule(lr=0.05))[2])
