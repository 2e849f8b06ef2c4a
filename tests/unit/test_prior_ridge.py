"""Ridge on top of the prior map from one pass of sums: exact, zero gain on position-only labels, and
a clear gain when the labels follow a planted activation direction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.metrics.bootstrap import difference_interval
from probes.metrics.image_scores import pearson, rmse, spearman
from probes.metrics.prior_ridge import PriorRidgeSums, upsample

GRID, SIZE, C, STEPS = (4, 4), (8, 8), 6, 2
LAMBDAS = (1e-6, 1e-3, 1e-1)


def _acts(rng, n):
    """Activations ``[n, S, T, C]`` that also encode position (as U-Net features do)."""
    pos = rng.normal(size=(GRID[0] * GRID[1], C))
    return torch.from_numpy(pos + rng.normal(size=(n, STEPS, *pos.shape)))


def _fit(x, y, batches=2, **kw):
    sums = PriorRidgeSums(GRID)
    for xb, yb in zip(x.chunk(batches), y.chunk(batches)):
        sums.update(xb, yb)
    return sums.solve(LAMBDAS, **kw)


def _gains(sol, x_test, y_test, shift, scale, step):
    """Per-image Pearson, Spearman and RMSE of head vs prior alone on the test images, at every λ."""
    z = ((y_test - shift) / scale).numpy()
    prior = np.broadcast_to(sol.prior_z.numpy(), z.shape)
    out = []
    for k in range(len(LAMBDAS)):
        head = sol.predict(x_test, k)[:, step].numpy()
        out.append([f(head, z).mean() - f(prior, z).mean() for f in (pearson, spearman)]
                   + [rmse(prior, z).mean() - rmse(head, z).mean()])
    return np.array(out)


@pytest.mark.parametrize("mode", ["offset", "input"])
@pytest.mark.parametrize("intercept", [False, True])
def test_labels_that_are_a_pure_function_of_position_give_zero_gain(mode, intercept):
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.normal(2.0, 1.0, size=SIZE))           # distinct values: no rank ties
    x = _acts(rng, 40)
    y = f.expand(40, *SIZE).clone()
    shift, scale = 2.0, 1.5
    sol = _fit(x[:28], y[:28], mode=mode, intercept=intercept, shift=shift, scale=scale)
    assert sol.w.abs().max() < 1e-8
    for step in range(STEPS):
        assert np.abs(_gains(sol, x[28:], y[28:], shift, scale, step)).max() < 1e-6


def test_labels_that_follow_a_planted_activation_direction_give_a_clear_gain():
    rng = np.random.default_rng(1)
    f = torch.from_numpy(rng.normal(size=SIZE))
    x = _acts(rng, 80)
    v = torch.from_numpy(rng.normal(size=C))
    signal = upsample(torch.einsum("btc,c->bt", x[:, 0], v), GRID, SIZE)
    y = f + signal + 0.3 * torch.from_numpy(rng.normal(size=(80, *SIZE)))
    for mode in ("offset", "input"):
        sol = _fit(x[:50], y[:50], mode=mode)
        g = _gains(sol, x[50:], y[50:], 0.0, 1.0, step=0)
        assert (g[0] > 0.2).all() and (g[1] > 0.2).all() and (g[2] > 0).all()
        z = y[50:].numpy()
        head = pearson(sol.predict(x[50:], 0)[:, 0].numpy(), z)
        prior = pearson(np.broadcast_to(sol.prior_z.numpy(), z.shape), z)
        assert difference_interval(head, prior).low > 0.2


@pytest.mark.parametrize("mode", ["offset", "input"])
@pytest.mark.parametrize("intercept", [False, True])
def test_solution_is_pixel_level_ridge_solved_directly(mode, intercept):
    """The sums give exactly the minimiser of (1/m)|t − X_pix w − U a|² + λ'|w|², λ' = λ · mean eig(XᵀX)."""
    rng = np.random.default_rng(2)
    n, (h, w), m = 12, SIZE, 4
    x = _acts(rng, n)
    y = torch.from_numpy(rng.normal(size=(n, *SIZE)) + rng.normal(size=SIZE))
    shift, scale = 0.3, 2.0
    sol = _fit(x, y, batches=3, mode=mode, intercept=intercept, shift=shift, scale=scale)
    z = ((y - shift) / scale).numpy().reshape(-1)
    pz = ((y.mean(0) - shift) / scale).numpy()
    for s in range(STEPS):
        xs = x[:, s].numpy()                                           # [n, T, C]
        xpix = upsample(torch.from_numpy(xs).permute(0, 2, 1), GRID, SIZE).permute(0, 2, 3, 1).reshape(-1, C).numpy()
        gram = np.einsum("ntc,ntd->cd", xs, xs)
        cols = ([np.tile(pz.reshape(-1), n)] if mode == "input" else []) + ([np.ones(n * h * w)] if intercept else [])
        u = np.stack(cols, 1) if cols else np.zeros((n * h * w, 0))
        target = z - (np.tile(pz.reshape(-1), n) if mode == "offset" else 0.0)
        a = np.concatenate([xpix, u], 1)
        for k, lam in enumerate(LAMBDAS):
            pen = np.zeros(a.shape[1])
            pen[:C] = lam * np.trace(gram) / C
            coef = np.linalg.solve(a.T @ a / m + np.diag(pen), a.T @ target / m)
            np.testing.assert_allclose(sol.w[k, s].numpy(), coef[:C], rtol=1e-6, atol=1e-9)
            extra = list(coef[C:])
            if mode == "input":
                assert sol.prior_coef[k, s].item() == pytest.approx(extra.pop(0), rel=1e-6, abs=1e-9)
            else:
                assert sol.prior_coef[k, s].item() == 1.0
            assert sol.intercept[k, s].item() == pytest.approx(extra.pop(0) if intercept else 0.0, rel=1e-6, abs=1e-9)


def test_bad_shapes_and_modes_are_named():
    sums = PriorRidgeSums(GRID)
    with pytest.raises(ValueError, match="T=16"):
        sums.update(torch.zeros(2, 9, C), torch.zeros(2, *SIZE))
    with pytest.raises(ValueError, match="no batch"):
        sums.solve(LAMBDAS)
    sums.update(torch.ones(2, 16, C), torch.zeros(2, *SIZE))
    with pytest.raises(ValueError, match="mode"):
        sums.solve(LAMBDAS, mode="concat")
