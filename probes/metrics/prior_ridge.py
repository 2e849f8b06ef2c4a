"""Gain over position for closed-form ridge probes, from sufficient statistics of one pass.

A probe's score mixes what the activations know about the image with what any predictor knows
from the pixel's position alone. The prior map (mean train label per pixel) captures the second
part, so the number that says what the activations *add* is

    gain = score(activations + prior) − score(prior)

where "activations + prior" is a ridge probe fitted on top of the prior map, either

- ``mode="offset"``: the prior is a fixed offset; the probe fits the residual ``y − p``
  (prediction ``Xw + p``), or
- ``mode="input"``: the prior is an extra, unpenalised input column with its own weight ``a``
  (prediction ``Xw + a p``).

Either way ``w = 0`` reproduces the prior exactly, so a label that is a pure function of position
gives ``w = 0`` and a gain of 0 (the prior is never shrunk by the ridge penalty; only ``w`` is).

**Exact at label resolution, in one pass.** The probe output is nearest-upsampled (constant on
each token's block of ``m`` pixels) while the prior map varies within a block, so the fit is least
squares over *pixels*, divided by ``m`` to keep ``probes/training/ridge.py``'s token-level scale.
The cross terms with ``X`` only see block means (``Xᵀp`` uses the prior's block means ``p_t``); the
prior's own terms (``pᵀp``, ``pᵀy``, ``1ᵀp``) are pixel sums. The prior map is itself the mean of
the train labels, unknown until the pass ends; but it depends on position only, so
``Xᵀp = Σ_t p_t Σ_i x_{i,t}``: the pass keeps per-position sums of ``X`` and per-pixel sums of the
labels, and every statistic is formed at solve time:

    XᵀX, Σ_i x_{i,t} (per position), Xᵀy_block, Σ_i Y_i (per pixel), N
    → Xᵀp, pᵀp, pᵀy, Xᵀ1, 1ᵀp, 1ᵀy, 1ᵀ1

Conventions follow ``ridge.py``: float64 sums, no intercept unless asked (``intercept=True`` adds
an unpenalised constant), λ relative to the mean eigenvalue of ``XᵀX`` (so one λ means the same
penalty as for the plain probe of that head), one eigendecomposition per head for the whole λ
grid, targets in the probe's space ``z = (y − shift) / scale`` (z-score: ``shift, scale = mean,
std``; binary ``2f − 1``: ``0.5, 0.5``), applied to label and prior alike at solve time. With
unpenalised columns ``U`` the ridge solution is taken after projecting ``U`` out (the exact
minimiser of ``|z − Xw − Ua|² + λ|w|²``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("offset", "input")


def block_mean(y: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[..., H, W]`` -> ``[..., h*w]``: each token's block mean (the label size is a multiple of the grid)."""
    hh, ww = y.shape[-2:]
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"label size {hh}x{ww} is not a multiple of the token grid {h}x{w}")
    return y.reshape(*y.shape[:-2], h, hh // h, w, ww // w).mean(dim=(-3, -1)).reshape(*y.shape[:-2], h * w)


def upsample(q: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Token values ``[..., h*w]`` -> ``[..., H, W]``, nearest (each token fills its block)."""
    h, w = grid
    q = q.reshape(*q.shape[:-1], h, w)
    return q.repeat_interleave(size[0] // h, -2).repeat_interleave(size[1] // w, -1)


class PriorRidgeSums:
    """The one-pass statistics of one layer (any leading dims, e.g. steps ``S``) and one task.

    :param grid: the layer's token grid ``(h, w)``; tokens are in row-major order.
    """

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = tuple(grid)
        self.gram: Tensor | None = None        # [..., C, C]   XᵀX over all tokens
        self.sum_x_pos: Tensor | None = None   # [..., T, C]   Σ_i x_{i,t}
        self.xty: Tensor | None = None         # [..., C]      Σ_{i,t} x_{i,t} y_block_{i,t}
        self.sum_y_pix: Tensor | None = None   # [H, W]        Σ_i Y_i (labels; shared by all heads)
        self.images = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch: activations ``x [B, ..., T, C]`` and raw labels ``y [B, H, W]`` (binary: 0/1 masks)."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        if x.shape[-2] != self.grid[0] * self.grid[1] or x.shape[0] != y.shape[0]:
            raise ValueError(f"activations {tuple(x.shape)} must be [B, ..., T={self.grid[0] * self.grid[1]}, C] "
                             f"for the grid {self.grid}, with one label map per image ({tuple(y.shape)})")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("non-finite activations or labels in a batch: the sums would be NaN; fix them upstream")
        yb = block_mean(y, self.grid)                                               # [B, T]
        parts = {"gram": torch.einsum("b...tc,b...td->...cd", x, x), "sum_x_pos": x.sum(0),
                 "xty": torch.einsum("b...tc,bt->...c", x, yb), "sum_y_pix": y.sum(0)}
        for name, value in parts.items():
            old = getattr(self, name)
            setattr(self, name, value if old is None else old + value)
        self.images += x.shape[0]

    def solve(self, lambdas: tuple[float, ...], mode: str = "offset", prior: Tensor | None = None,
              shift: float = 0.0, scale: float = 1.0, intercept: bool = False) -> PriorRidgeSolution:
        """The probes on top of the prior for every λ (see :func:`solve_prior_ridge`)."""
        if self.gram is None:
            raise ValueError("no batch was added: nothing to solve")
        return solve_prior_ridge(self.gram, self.sum_x_pos, self.xty, self.sum_y_pix, self.images, self.grid,
                                 lambdas, mode, prior, shift, scale, intercept)


@dataclass(frozen=True)
class PriorRidgeSolution:
    """Probes fitted on top of the prior, in target space ``z``, for every λ of the grid.

    Prediction of image ``i`` at pixel ``px`` (token ``t``): ``x_{i,t}·w + a·prior_z[px] + c``.
    """

    w: Tensor           # [K, ..., C]
    prior_coef: Tensor  # [K, ...]  a (1 in offset mode)
    intercept: Tensor   # [K, ...]  c (0 without intercept)
    prior_z: Tensor     # [H, W]    the prior map in target space
    grid: tuple[int, int]
    lambdas: tuple[float, ...]
    mode: str

    def predict(self, x: Tensor, k: int) -> Tensor:
        """``[B, ..., H, W]`` predictions in target space for activations ``x [B, ..., T, C]`` at λ index ``k``."""
        q = torch.einsum("b...tc,...c->b...t", x.to(torch.float64), self.w[k])
        out = upsample(q, self.grid, tuple(self.prior_z.shape))
        a, c = self.prior_coef[k][..., None, None], self.intercept[k][..., None, None]
        return out + a * self.prior_z + c


def solve_prior_ridge(gram: Tensor, sum_x_pos: Tensor, xty: Tensor, sum_y_pix: Tensor, images: int,
                      grid: tuple[int, int], lambdas: tuple[float, ...], mode: str = "offset",
                      prior: Tensor | None = None, shift: float = 0.0, scale: float = 1.0,
                      intercept: bool = False) -> PriorRidgeSolution:
    """Ridge on top of the prior map from the pass's sums (module docstring), for every λ.

    :param gram, sum_x_pos, xty, sum_y_pix, images: the sums of :class:`PriorRidgeSums`
        (``ridge.py`` already has ``gram`` and ``xty``; it would add the other two).
    :param prior: the prior map ``[H, W]`` in label units; default the train mean ``sum_y_pix / images``.
    :param shift, scale: the target transform ``z = (y − shift) / scale``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if images < 1 or scale <= 0:
        raise ValueError(f"need at least one train image and scale > 0; got images={images}, scale={scale}")
    size = tuple(sum_y_pix.shape)
    m = (size[0] // grid[0]) * (size[1] // grid[1])                     # pixels per token
    prior = sum_y_pix / images if prior is None else prior.to(torch.float64)
    pz = (prior - shift) / scale                                        # [H, W]
    zsum = (sum_y_pix - images * shift) / scale                         # Σ_i Z_i per pixel
    pt = block_mean(pz, grid)                                           # [T]
    sx = sum_x_pos.sum(-2)                                              # [..., C]
    xz = (xty - shift * sx) / scale                                     # Xᵀz
    xp = torch.einsum("...tc,t->...c", sum_x_pos, pt)                   # Xᵀp
    pp, pzs = images * (pz * pz).sum() / m, (pz * zsum).sum() / m       # pᵀp, pᵀz (pixel sums / m)
    one_p, one_z, one_one = images * pz.sum() / m, zsum.sum() / m, images * pz.numel() / m

    # unpenalised columns U and the target t: offset -> t = z − p; input -> U gets p
    if mode == "offset":
        xt = xz - xp
        cols, ut = ([sx], [one_z - one_p]) if intercept else ([], [])
        utu = [[one_one]] if intercept else []
    else:
        xt = xz
        cols, ut, utu = [xp], [pzs], [[pp]]
        if intercept:
            cols, ut, utu = [xp, sx], [pzs, one_z], [[pp, one_p], [one_p, one_one]]
    lead = gram.shape[:-2]
    lam = torch.tensor(lambdas, dtype=torch.float64, device=gram.device)
    scale_l = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[None] * lam.reshape(-1, *[1] * len(lead))  # [K, ...]
    a_mat, b_vec = gram, xt
    if cols:
        xu = torch.stack(cols, -1)                                      # [..., C, k]
        uu = torch.as_tensor(utu, dtype=torch.float64, device=gram.device)
        ut_v = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=gram.device) for v in ut])
        uu_inv = torch.linalg.pinv(uu, hermitian=True)                  # a constant prior with an intercept: min-norm
        a_mat = gram - xu @ uu_inv @ xu.transpose(-1, -2)
        b_vec = xt - (xu @ (uu_inv @ ut_v))
    evals, evecs = torch.linalg.eigh(a_mat)                             # [..., C], [..., C, C]
    proj = torch.einsum("...dc,...d->...c", evecs, b_vec)               # Qᵀb
    w = torch.einsum("...dc,k...c->k...d", evecs, proj[None] / (evals.clamp_min(0)[None] + scale_l[..., None]))
    k = len(lambdas)
    if cols:
        coef = torch.einsum("ij,k...j->k...i", uu_inv, ut_v - torch.einsum("...ci,k...c->k...i", xu, w))
    zero = torch.zeros((k, *lead), dtype=torch.float64, device=gram.device)
    if mode == "offset":
        a = zero + 1.0
        c = coef[..., 0] if intercept else zero
    else:
        a = coef[..., 0]
        c = coef[..., 1] if intercept else zero
    return PriorRidgeSolution(w=w, prior_coef=a, intercept=c, prior_z=pz, grid=tuple(grid), lambdas=tuple(lambdas),
                              mode=mode)
