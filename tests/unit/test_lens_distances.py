"""Distances by name: each one equals scipy's, aliases resolve, unknown names list valid ones."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import distance as scipy_distance

from probes.experiments.lens.distances import DEFAULT_DISTANCES, cdist, pairwise, resolve, valid_names

RNG = np.random.default_rng(0)
A, B = RNG.normal(size=(5, 7)), RNG.normal(size=(4, 7))


@pytest.mark.parametrize("name", [*DEFAULT_DISTANCES, "correlation", "braycurtis", "sqeuclidean"])
def test_each_distance_equals_scipy(name):
    np.testing.assert_allclose(cdist(A, B, name), scipy_distance.cdist(A, B, metric=name))


def test_aliases_and_kwargs():
    np.testing.assert_allclose(cdist(A, B, "manhattan"), scipy_distance.cdist(A, B, "cityblock"))
    np.testing.assert_allclose(cdist(A, B, "L2"), scipy_distance.cdist(A, B, "euclidean"))
    np.testing.assert_allclose(cdist(A, B, "linf"), scipy_distance.cdist(A, B, "chebyshev"))
    np.testing.assert_allclose(cdist(A, B, "minkowski", p=3),
                               scipy_distance.cdist(A, B, "minkowski", p=3))
    assert resolve("Manhattan") == "cityblock"


def test_pairwise_is_the_square_matrix():
    np.testing.assert_allclose(pairwise(A, "cosine"), scipy_distance.cdist(A, A, "cosine"),
                               atol=1e-12)
    assert pairwise(A[:1]).shape == (1, 1)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names:.*chebyshev.*cosine.*manhattan"):
        cdist(A, B, "hyperbolic")
    assert {"cosine", "euclidean", "cityblock", "chebyshev", "manhattan"} <= set(valid_names())
