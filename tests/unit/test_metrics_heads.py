"""Metrics against scipy on explicitly upsampled maps; losses against explicit upsampling;
the probe bank against separately trained probes."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from probes.diffusion.layers import LayerInfo
from probes.metrics.exact import BlockTargets, HeadMetrics, average_ranks, dice, pearson, rmse, spearman
from probes.training.heads import ProbeBank, binary_loss, regression_loss


def upsample(q: torch.Tensor, size: int) -> torch.Tensor:
    """[B, K, h, w] -> [B, K, size, size] nearest."""
    return F.interpolate(q, size=(size, size), mode="nearest")


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 4, 4, generator=g)
    q[0, 0, :2] = 0.5                                        # tied token values
    y = torch.randn(3, 16, 16, generator=g)
    y[1] = torch.round(y[1] * 2) / 2                          # many tied pixels
    return q, y


def test_average_ranks_match_scipy(maps):
    _, y = maps
    ours = average_ranks(y.reshape(3, -1))
    for b in range(3):
        np.testing.assert_allclose(ours[b].numpy(), scipy.stats.rankdata(y[b].flatten().numpy()))


def test_regression_metrics_match_scipy_on_upsampled_maps(maps):
    q, y = maps
    t = BlockTargets.build(y, (4, 4))
    sp, pe, rm = (f(q.reshape(3, 4, 16), t) for f in (spearman, pearson, rmse))
    up = upsample(q, 16)
    for b in range(3):
        for k in range(4):
            p, yy = up[b, k].flatten().numpy().astype(np.float64), y[b].flatten().numpy().astype(np.float64)
            assert sp[b, k].item() == pytest.approx(scipy.stats.spearmanr(p, yy).statistic, abs=1e-9)
            assert pe[b, k].item() == pytest.approx(scipy.stats.pearsonr(p, yy).statistic, abs=1e-9)
            assert rm[b, k].item() == pytest.approx(np.sqrt(np.mean((p - yy) ** 2)), abs=1e-9)


def test_regression_metrics_match_torchmetrics(maps):
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    q, y = maps
    t = BlockTargets.build(y, (4, 4))
    up = upsample(q, 16)[:, 1].reshape(3, -1).T.double()     # columns = images, as torchmetrics expects
    tgt = y.reshape(3, -1).T.double()
    torch.testing.assert_close(spearman(q.reshape(3, 4, 16), t)[:, 1].float(), spearman_corrcoef(up, tgt).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pearson(q.reshape(3, 4, 16), t)[:, 1].float(), pearson_corrcoef(up, tgt).float(), atol=1e-5, rtol=0)


def test_dice_matches_pixel_definition():
    g = torch.Generator().manual_seed(1)
    pos = torch.rand(2, 3, 16, generator=g) > 0.5
    tgt = (torch.rand(2, 16, 16, generator=g) > 0.6).float()
    tgt[1] = 0
    pos[1, 0] = False                                         # both empty -> 1
    ours = dice(pos, BlockTargets.build(tgt, (4, 4), ranks=False))
    up = upsample(pos.reshape(2, 3, 4, 4).float(), 16).bool()
    for b in range(2):
        for k in range(3):
            P, T = up[b, k], tgt[b].bool()
            ref = (2 * (P & T).sum().item() + 1e-6) / (P.sum().item() + T.sum().item() + 1e-6)
            assert ours[b, k].item() == pytest.approx(ref, rel=1e-9)
    assert ours[1, 0].item() == 1.0


def test_constant_prediction_scores_zero_correlation(maps):
    _, y = maps
    r = spearman(torch.zeros(3, 1, 16), BlockTargets.build(y, (4, 4)))
    assert torch.equal(r, torch.zeros(3, 1, dtype=torch.float64))


def test_head_metrics_average_over_images():
    m = HeadMetrics(["a", "b"], num_heads=4)
    m.update(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), slice(0, 2))
    m.update(torch.tensor([[[3.0, 0.0], [5.0, 0.0]], [[5.0, 1.0], [7.0, 2.0]]]), slice(0, 2))
    out = m.compute()
    torch.testing.assert_close(out[:, :2], torch.tensor([[3.0, 5.0], [1.0, 2.0]], dtype=torch.float64))
    assert torch.isnan(out[:, 2:]).all()


def test_losses_equal_explicit_upsampling():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 16, 2, generator=g)
    tgt = (torch.rand(2, 16, 16, generator=g) > 0.5).float()
    ours = binary_loss(logits, BlockTargets.build(tgt, (4, 4), ranks=False).mean)
    up = upsample(logits.permute(0, 1, 3, 2).reshape(2, 6, 4, 4), 16).reshape(2, 3, 2, 16, 16)
    for k in range(3):
        ref = F.cross_entropy(up[:, k], tgt.long(), reduction="none").mean((1, 2))
        torch.testing.assert_close(ours[:, k], ref, rtol=1e-5, atol=1e-6)    # block statistics vs pixels
    pred = torch.randn(2, 3, 16, generator=g) * 2
    y = torch.randn(2, 16, 16, generator=g) * 2
    ours = regression_loss(pred, y, (4, 4), delta=1.0)
    upp = upsample(pred.reshape(2, 3, 4, 4), 16)
    ref = F.huber_loss(upp, y[:, None].expand_as(upp), delta=1.0, reduction="none").mean((2, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bank_trains_exactly_like_separate_probes():
    """All steps' probes in one bank, summed loss, one Adam == one Adam per probe (same init, data)."""
    torch.manual_seed(0)
    layer = LayerInfo("up3.0", "m", channels=8, grid=(4, 4))
    bank = ProbeBank([layer], num_steps=3, out_dim=1)
    singles = [torch.nn.Parameter(bank.weight["up3_0"][s].detach().clone()) for s in range(3)]
    opt_bank = torch.optim.Adam(bank.parameters(), lr=1e-2)
    opts = [torch.optim.Adam([w], lr=1e-2) for w in singles]
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(4, 3, 16, 8, generator=g)
        y = torch.randn(4, 16, 16, generator=g)
        opt_bank.zero_grad()
        regression_loss(bank.forward_layer("up3.0", x)[..., 0], y, (4, 4)).mean(0).sum().backward()
        opt_bank.step()
        for s, (w, opt) in enumerate(zip(singles, opts)):
            opt.zero_grad()
            regression_loss((x[:, s] @ w)[:, None, :, 0], y, (4, 4)).mean().backward()
            opt.step()
    for s in range(3):
        torch.testing.assert_close(bank.weight["up3_0"][s], singles[s].detach(), atol=1e-6, rtol=1e-5)
