"""Mean-difference probes: the head formula against a direct computation, and a fit on a planted signal."""
from __future__ import annotations

import numpy as np
import torch

from probes.training.mean_difference import mean_difference_head


def test_head_equals_the_covariance_direction_scaled_by_least_squares():
    rng = np.random.default_rng(0)
    n, c = 4000, 6
    x = rng.normal(size=(n, c)) * rng.uniform(0.1, 2.0, size=c) + rng.normal(size=c) * 5   # large shared mean
    y = np.sign(x[:, 2] - 5 * 0 - x[:, 2].mean() + 0.3 * rng.normal(size=n))             # ±1 labels
    X = torch.from_numpy(x)[None]                                                         # one step
    w, b = mean_difference_head(torch.einsum("stc,std->scd", X, X), X.sum(1), torch.einsum("stc,st->sc", X, torch.from_numpy(y)[None]),
                                torch.tensor([y.sum()]), torch.tensor(float(n)))
    d = ((x - x.mean(0)) * (y - y.mean())[:, None]).mean(0)                               # Cov(x, y)
    p = (x - x.mean(0)) @ d
    a = (p * (y - y.mean())).sum() / (p * p).sum()                                        # 1-D least squares
    np.testing.assert_allclose(w[0].numpy(), a * d, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(b[0]), y.mean() - (a * d) @ x.mean(0), rtol=1e-6, atol=1e-9)
    # the direction is the class-mean difference (for ±1 labels Cov(x, y) ∝ μ+ - μ-)
    diff = x[y > 0].mean(0) - x[y < 0].mean(0)
    cos = float(d @ diff / np.linalg.norm(d) / np.linalg.norm(diff))
    assert cos > 0.999999
    # and it classifies: the planted channel carries the signal
    assert np.mean(np.sign(x @ w[0].numpy() + float(b[0])) == y) > 0.85


def test_a_head_with_no_signal_predicts_the_mean():
    x = torch.randn(1, 100, 3, dtype=torch.float64)
    y = torch.ones(1, 100, dtype=torch.float64)
    w, b = mean_difference_head(torch.einsum("stc,std->scd", x, x), x.sum(1), torch.einsum("stc,st->sc", x, y),
                                y.sum(1), torch.tensor(100.0, dtype=torch.float64))
    assert torch.all(w == 0) and torch.allclose(b, torch.ones(1, dtype=torch.float64))
