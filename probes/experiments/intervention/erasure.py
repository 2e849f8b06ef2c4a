"""Concept erasure for edits: the probe's edit may move the object, not repaint it (LEACE).

Why: the class-mean direction of a foreground probe also carries the training set's average object
colour, so an edit along it recolours objects, and a moved object no longer shows that the model
*uses* its position. Here the edit is confined to the activation directions that cannot change the
concepts that must stay (the object's colour and class), found in closed form by LEACE
(Belrose et al. 2023, the ``concept-erasure`` package) on the store's tokens.

The math (x: a token's activation in R^d; z: its concepts as concatenated one-hots in R^k).
LEACE's eraser is ``r(x) = x - Q (x - mu)``, ``Q = W⁺ P W``: ``W = Σ_xx^(-1/2)`` whitens, ``P`` is the
orthogonal projection onto ``col(W Σ_xz)``; after it ``Cov(r(x), z) = 0``, so no linear classifier
predicts z from r(x) better than a constant. The package stores ``Q = L R`` with ``R = Uᵀ W``
(``proj_right``, ``U`` an orthonormal basis of ``col(W Σ_xz)``) and ``L = W⁺ U`` (``proj_left``).

*"The edit cannot move the concepts linearly"* means: the concepts' best linear readout, the
least-squares regression ``ẑ(x) = Bᵀ(x - mu)`` with ``B = Σ_xx⁻¹ Σ_xz``, reads the same before and
after the edit ``δ``: ``Bᵀδ = 0``. Since ``span(B) = W col(W Σ_xz) = span(Rᵀ)``, that is ``R δ = 0``,
``δ ∈ ker R = ker Q`` (W is invertible: the covariance is shrunk). These are exactly the directions
the eraser passes unchanged: ``Q(x + δ - mu) = Q(x - mu)``, the token's concept part stays bit for
bit what it was and only its concept-free part ``r(x)`` moves.

Two projections have range ``ker R``: LEACE's own ``I - Q`` (orthogonal in the whitened metric) and
the Euclidean orthogonal projection ``Π = I - Rᵀ(R Rᵀ)⁺ R``. The edit uses **Π**, because the
editor's optimisers work in Euclidean activation space: with ``z = x + Π u`` (``u`` optimised
from 0) gradient descent is exactly projected gradient descent onto ``{z : R(z - x) = 0}`` (Adam,
elementwise, is projected Adam: ``z`` always satisfies the constraint), and the closed-form
``projection`` optimiser becomes the L2-smallest edit that makes the probe read its target while
keeping ``R x``: it moves each token along ``Π w`` (the probe direction, projected) by
``(t - x·w - b) / (w·Πw)``. ``I - Q`` would give the same guarantee with a different,
covariance-weighted edit.

Which tokens teach the eraser: those labelled in every erased concept (``-1``: no label). Background
tokens are left out on purpose: a "background" value of colour would make ``z`` contain the
foreground indicator itself, and erasing it would forbid the very edit being made.

Fitting choices: statistics in float64; ``shrinkage`` (the package's optimal linear shrinkage of
``Σ_xx``, on by default: well-conditioned whitening with few tokens per channel);
``constrain_cov_trace`` off (its mix with another projection, meant for erased features fed back
into a model, breaks ``Cov(r(x), z) = 0``, and nothing here feeds erased features back);
``svd_tol`` 1e-6 instead of the package's 0.01: the tolerance is absolute in whitened units
(class prior x Mahalanobis separation of the class mean), so 0.01 would leave rare colours with a
real but small separation unconstrained, while float64 statistics of a shrunk covariance are stable
far below it (the one exactly redundant direction per concept, its one-hots summing to 1, still
falls under it).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from concept_erasure import LeaceEraser, LeaceFitter
from torch import Tensor

from probes.diffusion.layers import LayerInfo
from probes.experiments.intervention.editor import ActivationEditor, EditRecord, EditSettings
from probes.experiments.intervention.objective import ProbeObjective
from probes.export.probeset import LinearProbe
from probes.toy.world import COLOURS, SHAPES, Render

#: the package's default svd_tol is 0.01; see the module docstring for why this one
SVD_TOL = 1e-6


# -- concepts per token --------------------------------------------------------------------------
class ConceptSource(Protocol):
    """A concept that must not change, as per-token integer labels of store samples.

    ``token_labels(index, grid)`` gives sample ``index``'s label per token of a ``grid`` = (h, w)
    token grid, row-major (``[h * w]``, the store's token order), in ``0 .. num_classes - 1``, or
    ``-1`` where the token has no label (background, mixed or unknown). Any labeler or prompt
    attribute can be one: exact masks in the toy world (:class:`MaskConcept`), a segmenter's
    classes, or a prompt's colour word spread over the object's tokens.
    """

    name: str
    num_classes: int

    def token_labels(self, index: int, grid: tuple[int, int]) -> np.ndarray: ...


def tokens_from_mask(mask: np.ndarray, grid: tuple[int, int], num_classes: int, min_share: float = 0.5) -> np.ndarray:
    """A pixel label map ``[H, W]`` (``-1`` = none) -> one label per token ``[h * w]``: the label
    covering the largest share of the token's block of pixels, kept where that share is at least
    ``min_share`` (a token mostly showing one object), else ``-1``."""
    mask = np.asarray(mask)
    (hh, ww), (h, w) = mask.shape, grid
    if hh % h or ww % w:
        raise ValueError(f"a {hh}x{ww} label map does not split into the {h}x{w} token grid; "
                         f"give maps at a size that is a multiple of the grid")
    if mask.size and (mask.min() < -1 or mask.max() >= num_classes):
        raise ValueError(f"label map values must lie in -1..{num_classes - 1}, got {mask.min()}..{mask.max()}")
    counts = np.zeros((h * w, num_classes + 1), np.int64)          # column 0: unlabelled pixels
    token = (np.arange(hh)[:, None] // (hh // h)) * w + np.arange(ww)[None, :] // (ww // w)
    np.add.at(counts, (token.ravel(), mask.astype(np.int64).ravel() + 1), 1)
    best = counts[:, 1:].argmax(1)
    share = counts[np.arange(h * w), best + 1] / counts.sum(1)
    return np.where(share >= min_share, best, -1).astype(np.int64)


@dataclass(frozen=True)
class MaskConcept:
    """A concept read from per-sample pixel label maps (``maps(index) -> [H, W]``, ``-1`` = none)."""

    name: str
    num_classes: int
    maps: Callable[[int], np.ndarray]
    min_share: float = 0.5

    def token_labels(self, index: int, grid: tuple[int, int]) -> np.ndarray:
        return tokens_from_mask(self.maps(index), grid, self.num_classes, self.min_share)


def toy_concepts(render_of: Callable[[int], Render], min_share: float = 0.5) -> dict[str, MaskConcept]:
    """The toy world's exact ``colour`` and ``class`` concepts, from the render a store sample shows.

    ``render_of(index)`` is the caller's knowledge of which scene sample ``index`` shows; exact only
    for a model whose image is that scene (otherwise label the generated image, e.g. with a labeler,
    and use :class:`MaskConcept` on its maps).
    """
    render = functools.lru_cache(maxsize=64)(render_of)
    return {"colour": MaskConcept("colour", len(COLOURS), lambda i: render(i).colours, min_share),
            "class": MaskConcept("class", len(SHAPES), lambda i: render(i).classes, min_share)}


def store_toy_concepts(store: Any, foreground: Callable[[np.ndarray], np.ndarray],
                       min_share: float = 0.5) -> dict[str, MaskConcept]:
    """The toy world's ``colour`` and ``class`` concepts for a toy store's samples.

    - Store of renders (``generation.start: renders``, ``configs/toy/exact.yaml``): its images *are*
      the scenes its prompts name (``source_id``), so the renderer's masks are exact
      (:func:`toy_concepts`).
    - Sampled store: an image shows the caption's objects wherever the model drew them, so the
      scene's masks would label the wrong tokens. The concepts come from the caption instead (a prompt
      attribute): a one-object caption (``a blue sphere``) names the object's colour and class, spread
      over the pixels ``foreground(images [1, H, W, 3]) -> [1, H, W]`` (> 0.5) marks as object, e.g. the
      toy foreground labeler; samples of several objects leave every token unlabelled (they do not
      say which object is where), so they teach the eraser nothing.
    """
    from probes.toy.prompts import scene_of
    from probes.toy.world import render

    prompts = store.manifest.get("prompts") or []
    generation = store.manifest.get("generation", {})
    if generation.get("start", "noise") == "renders":
        size = int(generation.get("height") or generation.get("width") or 64)
        return toy_concepts(lambda i: render(scene_of(str(prompts[i].get("source_id", ""))), size), min_share)
    shape = tuple(store.images.shape[1:3])

    @functools.lru_cache(maxsize=64)
    def named(i: int) -> tuple[int, int] | None:
        words = str(prompts[i].get("prompt", "")).split() if i < len(prompts) else []
        if len(words) != 3 or words[0] not in ("a", "an") or words[1] not in COLOURS or words[2] not in SHAPES:
            return None
        return COLOURS.index(words[1]), SHAPES.index(words[2])

    @functools.lru_cache(maxsize=64)
    def object_mask(i: int) -> np.ndarray:
        return np.asarray(foreground(np.array(store.image(i))[None]))[0] > 0.5      # a copy: memmaps are read-only

    def maps(which: int) -> Callable[[int], np.ndarray]:
        def label_map(i: int) -> np.ndarray:
            n = named(int(i))
            if n is None:
                return np.full(shape, -1, np.int64)
            return np.where(object_mask(int(i)), n[which], -1).astype(np.int64)
        return label_map

    return {"colour": MaskConcept("colour", len(COLOURS), maps(0), min_share),
            "class": MaskConcept("class", len(SHAPES), maps(1), min_share)}


def select_concepts(names: Sequence[str], available: Mapping[str, ConceptSource]) -> list[ConceptSource]:
    """The sources of ``erase: [names]`` (empty: erasure off); unknown names list the valid ones."""
    unknown = [n for n in names if n not in available]
    if unknown:
        raise KeyError(f"erase names unknown concepts {unknown}; available: {sorted(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"erase lists a concept twice: {list(names)}")
    return [available[n] for n in names]


def one_hot_concepts(labels: Sequence[np.ndarray], num_classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token labels of several concepts -> (tokens labelled in every concept ``[N]`` bool,
    their concatenated one-hots ``[n_kept, sum(num_classes)]`` float64)."""
    if not labels or len(labels) != len(num_classes):
        raise ValueError(f"give one label array per concept ({len(labels)} arrays, {len(num_classes)} class counts)")
    labels = [np.asarray(lab, np.int64) for lab in labels]
    if len({lab.shape for lab in labels}) != 1:
        raise ValueError(f"concept label arrays differ in shape: {[lab.shape for lab in labels]}")
    for lab, k in zip(labels, num_classes):
        if lab.size and (lab.min() < -1 or lab.max() >= k):
            raise ValueError(f"concept labels must lie in -1..{k - 1}, got {lab.min()}..{lab.max()}")
    keep = np.logical_and.reduce([lab >= 0 for lab in labels])
    z = np.concatenate([np.eye(k)[lab[keep]] for lab, k in zip(labels, num_classes)], axis=1)
    return keep, z


# -- the eraser and the allowed edits ------------------------------------------------------------
def new_fitter(channels: int, concept_dims: int, shrinkage: bool = True, svd_tol: float = SVD_TOL) -> LeaceFitter:
    """LEACE statistics in float64 on the CPU, with the settings of the module docstring."""
    return LeaceFitter(channels, concept_dims, method="leace", affine=True, constrain_cov_trace=False,
                       dtype=torch.float64, shrinkage=shrinkage, svd_tol=svd_tol)


@dataclass(frozen=True)
class ConceptEraser:
    """A fitted LEACE eraser and the orthogonal projection onto the edits it allows.

    :param eraser: the package's eraser (``r(x) = x - L R (x - mu)``).
    :param basis: ``[d, r]`` orthonormal basis of ``span(Rᵀ)``, the concept readout's directions.
    :param concepts: the erased concepts' names.
    :param tokens: how many tokens it was fitted on.
    """

    eraser: LeaceEraser
    basis: Tensor
    concepts: tuple[str, ...] = ()
    tokens: int = 0

    @classmethod
    def from_fitter(cls, fitter: LeaceFitter, concepts: Sequence[str] = ()) -> ConceptEraser:
        if int(fitter.n) < 2:
            raise ValueError(f"LEACE needs at least 2 labelled tokens to fit {list(concepts)}, got {int(fitter.n)}; "
                             f"use more samples, or check that the concept maps label the objects")
        eraser = fitter.eraser
        u, s, _ = torch.linalg.svd(eraser.proj_right.mT, full_matrices=False)
        rank = int((s > s.max().clamp_min(0) * max(u.shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0
        return cls(eraser, u[:, :rank].contiguous(), tuple(concepts), int(fitter.n))

    @property
    def rank(self) -> int:
        """How many directions the edit may not use."""
        return self.basis.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ConceptEraser:
        e = self.eraser
        moved = LeaceEraser(e.proj_left.to(device, dtype), e.proj_right.to(device, dtype),
                            None if e.bias is None else e.bias.to(device, dtype))
        return ConceptEraser(moved, self.basis.to(device, dtype), self.concepts, self.tokens)

    def erase(self, x: Tensor) -> Tensor:
        """LEACE's ``r(x)`` along the last dimension (no linear information of the concepts left)."""
        return self.eraser(x.to(self.basis.dtype))

    def readout(self, x: Tensor) -> Tensor:
        """``R x``: the coordinates every linear readout of the concepts is a function of."""
        return x.to(self.basis.dtype) @ self.eraser.proj_right.mT

    def project(self, v: Tensor) -> Tensor:
        """``Π v`` along the last dimension: the part of ``v`` that moves no concept readout."""
        b = self.basis.to(v.device, v.dtype)
        return v - (v @ b) @ b.mT


def fit_eraser(x: Tensor, labels: Sequence[np.ndarray], num_classes: Sequence[int], concepts: Sequence[str] = (),
               shrinkage: bool = True, svd_tol: float = SVD_TOL) -> ConceptEraser:
    """Fit on tokens ``x [N, d]`` with per-token ``labels`` (one ``[N]`` array per concept)."""
    keep, z = one_hot_concepts(labels, num_classes)
    fitter = new_fitter(x.shape[-1], z.shape[1], shrinkage, svd_tol)
    if keep.any():
        fitter.update(x.reshape(-1, x.shape[-1])[torch.from_numpy(keep)].to(torch.float64), torch.from_numpy(z))
    return ConceptEraser.from_fitter(fitter, concepts)


def fit_store_erasers(store: Any, sources: Sequence[ConceptSource], keys: Iterable[tuple[int, str]],
                      indices: Sequence[int], half: str = "cond", shrinkage: bool = True, svd_tol: float = SVD_TOL,
                      progress: Callable[[Iterable], Iterable] = iter) -> dict[tuple[int, str], ConceptEraser]:
    """One eraser per (step, layer) of ``keys``, fitted on the store's tokens of samples ``indices``.

    Fit on training samples only (the test split is what the intervention is scored on). Each
    (step, layer) gets its own fit: what a layer encodes about colour changes along the denoising.
    """
    if not sources:
        raise ValueError("no concepts to erase: pass the sources of erase: [...] (an empty list means erasure off)")
    keys = sorted({(int(s), str(layer)) for s, layer in keys})
    capture = store.manifest["capture"]
    slot = {int(s): k for k, s in enumerate(capture["steps"])}
    grids = {layer["name"]: tuple(layer["grid"]) for layer in capture["layers"]}
    if half not in capture["halves"]:
        raise ValueError(f"the store at {store.root} holds halves {capture['halves']}, not {half!r}")
    h = list(capture["halves"]).index(half)
    for step, layer in keys:
        if step not in slot:
            raise ValueError(f"step {step} is not in the store at {store.root} (captured steps {capture['steps']})")
        if layer not in store.acts:
            raise KeyError(f"layer {layer!r} is not in the store at {store.root}; stored: {', '.join(store.layer_names)}")
    fitters = {key: new_fitter(int(store.acts[key[1]].shape[-1]), sum(s.num_classes for s in sources), shrinkage,
                               svd_tol) for key in keys}
    for index in progress(list(indices)):
        per_grid: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for step, layer in keys:
            grid = grids[layer]
            if grid not in per_grid:
                per_grid[grid] = one_hot_concepts([s.token_labels(int(index), grid) for s in sources],
                                                  [s.num_classes for s in sources])
            keep, z = per_grid[grid]
            if keep.any():
                x = np.asarray(store.activation(layer, int(index))[slot[step], h], np.float64)
                fitters[(step, layer)].update(torch.from_numpy(x[keep]), torch.from_numpy(z))
    names = [s.name for s in sources]
    return {key: ConceptEraser.from_fitter(f, names) for key, f in fitters.items()}


# -- the constrained edit ------------------------------------------------------------------------
def optimise_in_subspace(acts: Tensor, objective: ProbeObjective, settings: EditSettings,
                         project: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~probes.intervention.editor.optimise_activation` with every edit in ``project``'s range:
    ``z = x + project(u)``, ``u`` optimised from 0 (``projection``: the closed form along the
    projected probe direction). Returns (edited, loss before, loss after), per image."""
    device_type = acts.device.type
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        x = acts.detach().to(torch.float32, copy=True)
        with torch.no_grad():
            before = objective(x)
        if settings.iterations == 0:
            z = x
        elif settings.optimizer == "projection":
            with torch.no_grad():
                z = objective.project(x, constrain=project)
        else:
            u = torch.zeros_like(x, requires_grad=True)
            optim = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
            opt = optim([u], lr=settings.lr)
            for _ in range(settings.iterations):
                opt.zero_grad(set_to_none=True)
                objective(x + project(u)).sum().backward()
                opt.step()
            with torch.no_grad():
                z = x + project(u)
        with torch.no_grad():
            after = objective(z)
    return z.detach(), before, after


class ErasingEditor(ActivationEditor):
    """:class:`~probes.intervention.editor.ActivationEditor` whose edits at each (step, layer) with
    an eraser stay in the directions that move no erased concept (module docstring).

    :param erasers: ``{(step, layer): ConceptEraser}``; empty: the plain editor, bit for bit
        (``erase: []``). When given, every planned (step, layer) needs one.
    """

    def __init__(self, unet: nn.Module, probes: Sequence[LinearProbe], layers: Sequence[LayerInfo], target: Tensor,
                 settings: EditSettings = EditSettings(), guidance: bool = True,
                 on_edit: Callable[[EditRecord], None] | None = None,
                 erasers: Mapping[tuple[int, str], ConceptEraser] | None = None, cfg: str | None = None,
                 measure: Callable[[tuple[int, str], Tensor, Tensor], list[float] | None] | None = None) -> None:
        super().__init__(unet, probes, layers, target, settings, guidance, on_edit, cfg, measure)
        self.erasers = dict(erasers or {})
        if self.erasers:
            missing = sorted(set(self.plan) - set(self.erasers))
            if missing:
                raise ValueError(f"no eraser for the planned edits at (step, layer) {missing}; fit erasers for "
                                 f"every edited step and layer, or pass none (erase: [])")
            for key, probe in self.plan.items():
                d = self.erasers[key].basis.shape[0]
                if d != probe.info.channels:
                    raise ValueError(f"the eraser for {key} has {d} channels but probe {probe.info.key} "
                                     f"has {probe.info.channels}: fit it on the same model's store")
        self._on_device: dict[tuple[tuple[int, str], str], ConceptEraser] = {}

    def _optimise(self, key: tuple[int, str], acts: Tensor, objective: ProbeObjective) -> tuple[Tensor, Tensor, Tensor]:
        if key not in self.erasers:
            return super()._optimise(key, acts, objective)
        cached = (key, str(acts.device))
        if cached not in self._on_device:
            self._on_device[cached] = self.erasers[key].to(acts.device)
        return optimise_in_subspace(acts, objective, self.settings, self._on_device[cached].project)
