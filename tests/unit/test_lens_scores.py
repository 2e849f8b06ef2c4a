"""Class scores, chance levels and instance matching on small cases checked by hand."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from probes.experiments.lens.distances import pairwise
from probes.experiments.lens.scores import (
    average_precisions,
    class_scores,
    class_separation,
    expected_random_ap,
    instance_matching_accuracy,
    knn_accuracy,
    knn_chance,
    knn_predict,
    layer_ablation,
    map_chance,
    matching_chance,
    retrieval_map,
)

# Four points on a line, classes a a b b. Distances:
#   0-1: 1   0-3: 3   0-10: 10   1-3: 2   1-10: 9   3-10: 7
X = np.array([[0.0], [1.0], [3.0], [10.0]])
Y = np.array(["a", "a", "b", "b"])
D = pairwise(X, "euclidean")


def test_knn_accuracy_by_hand():
    # k=1: x=0 -> 1 (a) ok; x=1 -> 0 (a) ok; x=3 -> 1 (a, d=2) wrong; x=10 -> 3 (b) ok  => 3/4
    assert knn_accuracy(D, Y, k=1) == pytest.approx(3 / 4)
    # k=2, ties go to the class of the nearest neighbour:
    # x=0: 1(a),3(b) tie -> a ok; x=1: 0(a),3(b) tie -> a ok; x=3: 1(a),0(a) -> a wrong;
    # x=10: 3(b),1(a) tie -> b ok  => 3/4
    assert knn_predict(D, Y, k=2).tolist() == ["a", "a", "a", "b"]
    # k=3: x=0: a,b,b -> b; x=1: a,b,b -> b; x=3: a,a,b -> a; x=10: b,a,a -> a  => all wrong
    assert knn_accuracy(D, Y, k=3) == 0.0
    assert knn_accuracy(D, Y, k=99) == 0.0          # k is capped at N-1 = 3
    assert knn_chance(Y) == 0.5


def test_distance_ties_follow_item_order():
    # item 0 is at distance 1 from both item 1 and item 2: the earlier item (1) is its neighbour
    d = pairwise(np.array([[0.0], [1.0], [-1.0]]), "euclidean")
    assert knn_predict(d, ["x", "y", "z"], k=1)[0] == "y"


def test_map_by_hand():
    # Each query has one relevant item. Ranks: x=0 -> 1(a) first: AP 1; x=1 -> 0(a) first: AP 1;
    # x=3 -> 1(a), 0(a), 10(b): relevant at rank 3, AP 1/3; x=10 -> 3(b) first: AP 1.
    np.testing.assert_allclose(average_precisions(D, Y), [1, 1, 1 / 3, 1])
    assert retrieval_map(D, Y) == pytest.approx((3 + 1 / 3) / 4)
    # Two relevant items: x=0 of [0, 1, 5, 2] with classes a a a b ranks 1(a), 2(b), 5(a):
    # precision 1/1 at rank 1 and 2/3 at rank 3 -> AP (1 + 2/3) / 2 = 5/6
    ap = average_precisions(pairwise(np.array([[0.0], [1.0], [5.0], [2.0]]), "euclidean"),
                            [0, 0, 0, 1])
    assert ap[0] == pytest.approx(5 / 6)
    assert np.isnan(ap[3])                           # class b has no other member
    # map_chance for Y: every query has R=1 relevant among M=3, so E[AP] = E[1/rank]
    # = (1 + 1/2 + 1/3) / 3 = 11/18
    assert map_chance(Y) == pytest.approx(11 / 18)


def _ap(relevant: tuple[bool, ...]) -> float:
    hits, total = 0, 0.0
    for rank, rel in enumerate(relevant, start=1):
        if rel:
            hits += 1
            total += hits / rank
    return total / hits


@pytest.mark.parametrize("r,m", [(1, 1), (1, 2), (2, 4), (3, 5), (5, 5)])
def test_expected_random_ap_matches_enumeration(r, m):
    rankings = set(itertools.permutations([True] * r + [False] * (m - r)))
    brute = np.mean([_ap(p) for p in rankings])       # all rankings are equally likely
    assert expected_random_ap(r, m) == pytest.approx(brute)


def test_class_separation_by_hand():
    # intra pairs: (0,1)=1, (3,10)=7 -> mean 4; inter: 3, 10, 2, 9 -> mean 6; ratio 2/3
    sep = class_separation(D, Y)
    assert sep == pytest.approx({"intra": 4.0, "inter": 6.0, "ratio": 2 / 3})
    assert np.isnan(class_separation(D, ["a"] * 4)["inter"])


def test_instance_matching():
    gallery = np.eye(3)
    gallery_ids = np.array([10, 20, 30])
    query = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.3]])
    # the first two match ids 20 and 10; the third (id 99) is not in the gallery: left out
    assert instance_matching_accuracy(query, [20, 10, 99], gallery, gallery_ids) == 1.0
    assert instance_matching_accuracy(query, [10, 20, 99], gallery, gallery_ids,
                                      "euclidean") == 0.0
    assert np.isnan(instance_matching_accuracy(query[:1], [99], gallery, gallery_ids))
    assert matching_chance([20, 10, 99], gallery_ids) == pytest.approx(1 / 3)


def test_class_scores_and_layer_ablation():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 6)
    good = np.eye(3)[y] * 5 + rng.normal(scale=0.1, size=(18, 3))
    bad = rng.normal(size=(18, 3))
    scores = class_scores(good, y, "euclidean")
    assert scores["knn_accuracy"] == 1.0 and scores["map"] == pytest.approx(1.0)
    assert scores["knn_chance"] == pytest.approx(1 / 3)
    rows = layer_ablation({"bad": bad, "good": good}, y, ["cosine", "euclidean"])
    assert len(rows) == 4
    assert [r["layers"] for r in rows[:2]] == ["good", "good"]
    assert {"layers", "distance", "n", "dim", "knn_accuracy", "map", "map_chance",
            "ratio"} <= rows[0].keys()
    by_ratio = layer_ablation({"bad": bad, "good": good}, y, ["euclidean"], sort_by="ratio")
    assert by_ratio[0]["layers"] == "good" and by_ratio[0]["ratio"] < by_ratio[1]["ratio"]
    with pytest.raises(ValueError, match="NaN"):
        layer_ablation({"x": np.full((18, 2), np.nan)}, y)
