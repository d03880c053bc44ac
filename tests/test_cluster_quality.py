"""Cluster purity / NMI against GT classes: a hand-computed example, a naive reimplementation, box matching."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.records import ImageRecord
from pipeline.evaluation.cluster_quality import cluster_quality, cluster_quality_for_boxes, match_boxes_to_classes


def _naive_nmi(u, v):
    """Loops over pairs; arithmetic-mean normalisation, scikit-learn's special cases."""
    n = len(u)
    us, vs = sorted(set(u)), sorted(set(v))
    if len(us) == len(vs) == 1:
        return 1.0
    mi = 0.0
    for a in us:
        for b in vs:
            nab = sum(1 for x, y in zip(u, v) if x == a and y == b)
            if nab:
                na, nb = u.count(a), v.count(b)
                mi += nab / n * math.log(n * nab / (na * nb))
    if mi <= 1e-15:
        return 0.0
    h = lambda lab: -sum(lab.count(a) / n * math.log(lab.count(a) / n) for a in set(lab))  # noqa: E731
    return mi / ((h(u) + h(v)) / 2)


def _naive_purity(u, v):
    return sum(max(sum(1 for x, y in zip(u, v) if x == a and y == b) for b in set(v)) for a in set(u)) / len(u)


def test_hand_computed_example():
    # clusters {a: 2 x c0}, {b: c0 + c1}, {c: 2 x c1}: MI = 2/3 ln 2, H(classes) = ln 2, H(clusters) = ln 3
    q = cluster_quality(["a", "a", "b", "b", "c", "c"], [0, 0, 0, 1, 1, 1])
    assert q["purity"] == pytest.approx(5 / 6)
    assert q["mutual_info"] == pytest.approx(2 / 3 * math.log(2))
    assert q["nmi"] == pytest.approx((2 / 3 * math.log(2)) / ((math.log(2) + math.log(3)) / 2))
    assert q["nmi"] == pytest.approx(0.5158037429793889)  # scikit-learn's value for this pair
    assert q["confusion"] == [[2, 0], [1, 1], [0, 2]]
    assert q["majority"]["a"] == {"class": 0, "count": 2, "size": 2, "fraction": 1.0}


def test_special_cases():
    assert cluster_quality([1, 1, 1], ["x", "x", "x"])["nmi"] == 1.0   # both constant: sklearn says 1
    assert cluster_quality([1, 2, 3], ["x", "x", "x"])["nmi"] == 0.0   # no information
    assert cluster_quality([1, 1, 2, 2], ["y", "y", "x", "x"])["nmi"] == pytest.approx(1.0)  # a relabelling
    assert cluster_quality([1, 1, 2, 2], ["y", "y", "x", "x"])["purity"] == 1.0
    empty = cluster_quality([], [])
    assert empty["purity"] is None and empty["nmi"] is None and empty["n"] == 0
    with pytest.raises(ValueError):
        cluster_quality([1, 2], [1])


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_implementation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    u = [int(x) for x in rng.integers(0, int(rng.integers(1, 7)), n)]
    v = [f"c{x}" for x in rng.integers(0, int(rng.integers(1, 5)), n)]
    q = cluster_quality(u, v)
    assert q["nmi"] == pytest.approx(_naive_nmi(u, v), abs=1e-12)
    assert q["purity"] == pytest.approx(_naive_purity(u, v))
    assert np.asarray(q["confusion"]).sum() == n


def _rec(cid, boxes, classes, crowd=None):
    return ImageRecord(image_id=str(cid), coco_id=cid, path=f"/x/{cid}.jpg", width=100, height=100,
                       boxes=np.asarray(boxes, float), classes=classes,
                       crowd=np.asarray(crowd if crowd is not None else [False] * len(classes)))


def test_box_matching_and_no_class_column():
    records = [_rec(1, [[0, 0, 50, 50], [40, 40, 100, 100]], ["cat", "dog"]),
               _rec(2, [[0, 0, 100, 100]], ["person"], crowd=[True]),
               _rec(3, [[10, 10, 60, 60]], ["cat"])]
    coco = {"categories": [{"id": 1, "name": "cluster_0"}, {"id": 2, "name": "cluster_1"},
                           {"id": 3, "name": "cluster_2"}],
            "annotations": [
                {"image_id": 1, "bbox": [0, 0, 50, 50], "category_id": 1},     # cat (IoU 1)
                {"image_id": 1, "bbox": [45, 45, 55, 55], "category_id": 2},   # dog (highest IoU)
                {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 2},     # IoU 0.04: no class
                {"image_id": 2, "bbox": [0, 0, 100, 100], "category_id": 1},   # only a crowd box: no class
                {"image_id": 3, "bbox": [10, 10, 60, 60], "category_id": 1},   # cat
                {"image_id": 9, "bbox": [0, 0, 5, 5], "category_id": 2}]}      # unknown image: no class
    assert match_boxes_to_classes(coco, records) == ["cat", "dog", None, None, "cat", None]
    q = cluster_quality_for_boxes(coco, records)
    assert q["clusters"] == ["cluster_0", "cluster_1", "cluster_2"]   # cluster_2 empty but listed
    assert q["classes"] == ["cat", "dog"]
    assert q["confusion"] == [[2, 0], [0, 1], [0, 0]]
    assert q["unmatched_per_cluster"] == [1, 2, 0]
    assert q["boxes"] == 6 and q["matched"] == 3 and q["matched_fraction"] == pytest.approx(0.5)
    assert q["purity"] == 1.0 and q["nmi"] == pytest.approx(1.0)
