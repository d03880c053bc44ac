"""Hungarian cluster-to-class evaluation: permuted GT, K > / < classes, a hand-computed partial case."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.records import ImageRecord
from pipeline.evaluation.hungarian import detections_from_coco_results, hungarian_evaluate, to_markdown

CLASSES = ["cat", "dog", "car", "boat", "bird"]


def scene(seed=0, n_images=12):
    """Random images with 1-4 objects of random classes (some difficult)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        n = int(rng.integers(1, 5))
        x1, y1 = rng.uniform(0, 200, n), rng.uniform(0, 200, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(20, 100, n), y1 + rng.uniform(20, 100, n)], 1)
        cls = [CLASSES[c] for c in rng.integers(0, len(CLASSES), n)]
        records.append(ImageRecord(f"im{i}", 100 + i, f"im{i}.jpg", 300, 300, boxes, cls, rng.random(n) < 0.1))
    for j, c in enumerate(CLASSES):  # every class present at least once, not difficult
        records.append(ImageRecord(f"extra{j}", 500 + j, "x.jpg", 300, 300, [[10, 10, 60, 60]], [c], [False]))
    return records


def gt_as_coco_results(records, cluster_of_class, rng):
    return [{"image_id": r.coco_id, "category_id": int(cluster_of_class[c]), "score": float(rng.random()),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for r in records for b, c in zip(r.boxes, r.classes)]


def test_permuted_ground_truth_is_matched_back():
    records = scene()
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(CLASSES))               # class c is labelled cluster perm[c]
    res = hungarian_evaluate(gt_as_coco_results(records, dict(zip(CLASSES, perm)), rng), records, CLASSES)
    assert res["mean"] == {"AP50": pytest.approx(100), "AP75": pytest.approx(100), "AP50:95": pytest.approx(100)}
    assert res["matching"] == {c: int(perm[i]) for i, c in enumerate(CLASSES)}
    inverse = np.argsort(perm)                         # cluster k is class inverse[k]
    assert {k: c for c, k in res["matching"].items()} == {k: CLASSES[inverse[k]] for k in range(len(CLASSES))}
    assert res["unmatched_clusters"] == [] and res["unmatched_classes"] == [] and res["classes_without_gt"] == []
    m = np.array(res["ap50_matrix"])
    assert m.shape == (5, 5) and np.allclose(m[np.arange(5), perm], 100)
    off = m.copy()
    off[np.arange(5), perm] = np.nan
    assert np.nanmax(off) < 100


def test_more_clusters_than_classes_reports_the_extra_clusters():
    records = scene(seed=2)
    rng = np.random.default_rng(3)
    mapping = {c: 10 + 2 * i for i, c in enumerate(CLASSES)}   # clusters 10, 12, ..., 18
    results = gt_as_coco_results(records, mapping, rng)
    for r in records[:6]:                                      # clusters 7 and 9: junk boxes
        results.append({"image_id": r.coco_id, "category_id": 7, "score": 0.99, "bbox": [250, 250, 30, 30]})
        results.append({"image_id": r.coco_id, "category_id": 9, "score": 0.5, "bbox": [0, 280, 20, 20]})
    res = hungarian_evaluate(results, records, CLASSES, cluster_ids=[7, 9, 10, 11, 12, 14, 16, 18])
    assert res["matching"] == mapping
    assert res["unmatched_clusters"] == [7, 9, 11]              # 11 has no detection at all
    assert res["mean"]["AP50"] == pytest.approx(100) and res["unmatched_classes"] == []
    assert np.array(res["ap50_matrix"]).shape == (5, 8)


def test_fewer_clusters_than_classes_leaves_a_class_at_zero():
    records = [ImageRecord(f"i{j}", j, "x.jpg", 100, 100, [[0, 0, 50, 50]], [c], [False])
               for j, c in enumerate(["a", "a", "b", "b", "c", "c"])]
    det = {r.image_id: {"boxes": r.boxes, "labels": np.array([0 if r.classes[0] in "ab" else 1]),
                        "scores": np.array([0.9 if r.classes[0] != "b" else 0.4])} for r in records}
    res = hungarian_evaluate(det, records, ["a", "b", "c"])
    # cluster 0 holds a (high scores) and b (low): AP(a) = 100, AP(b) = 0.5*0.5 + 0.5*0.5 = 50
    assert np.array(res["ap50_matrix"]).round(6).tolist() == [[100, 0], [50, 0], [0, 100]]
    assert res["matching"] == {"a": 0, "c": 1}
    assert res["unmatched_classes"] == ["b"] and res["unmatched_clusters"] == []
    assert res["per_class"]["b"] == {"cluster": None, "AP50": 0.0, "AP75": 0.0, "AP50:95": 0.0}
    assert res["mean"]["AP50"] == pytest.approx(200 / 3)
    md = to_markdown(res)
    assert "| b | - | 0.00 |" in md and "Unmatched classes (AP 0): b" in md and "**66.67**" in md


def test_partial_overlaps_hand_computed():
    records = [
        ImageRecord("1", 1, "1.jpg", 500, 500, [[0, 0, 100, 100], [200, 200, 300, 300]], ["cat", "cat"]),
        ImageRecord("2", 2, "2.jpg", 500, 500, [[0, 0, 50, 50]], ["dog"]),
        ImageRecord("3", 3, "3.jpg", 500, 500, [[0, 0, 10, 10]], ["zebra"], [True]),   # only difficult
    ]
    det = {"1": {"boxes": np.array([[0, 0, 100, 82], [200, 200, 300, 262], [400, 400, 410, 410]]),
                 "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 1, 1])},
           "2": {"boxes": np.array([[0, 0, 50, 50]]), "scores": np.array([0.5]), "labels": np.array([2])}}
    res = hungarian_evaluate(det, records, ["cat", "dog", "zebra"])
    # cat / cluster 1: IoUs 0.82 and 0.62 and a miss.
    #   t in .50 .55 .60: TP TP FP -> AP 1;  t in .65 .. .80: TP FP FP -> 0.5;  t >= .85: 0
    cat = res["per_class"]["cat"]
    assert cat["cluster"] == 1 and cat["AP50"] == pytest.approx(100) and cat["AP75"] == pytest.approx(50)
    assert cat["AP50:95"] == pytest.approx((3 * 100 + 4 * 50) / 10)
    assert res["per_class"]["dog"] == {"cluster": 2, "AP50": 100.0, "AP75": 100.0, "AP50:95": 100.0}
    assert res["classes_without_gt"] == ["zebra"] and "zebra" not in res["per_class"]
    assert res["mean"] == pytest.approx({"AP50": 100, "AP75": 75, "AP50:95": 75})
    assert res["ap50_matrix"] == [[100, 0], [0, 100], [None, None]]


def test_bad_detections_have_clear_errors():
    records = scene(n_images=2)
    with pytest.raises(ValueError, match="not in the ground-truth dataset"):
        hungarian_evaluate([{"image_id": 99999, "category_id": 1, "score": 1, "bbox": [0, 0, 1, 1]}], records)
    with pytest.raises(ValueError, match="lacks"):
        detections_from_coco_results([{"image_id": 100, "bbox": [0, 0, 1, 1]}], records)
    with pytest.raises(ValueError, match="nothing to match"):
        hungarian_evaluate([], records, CLASSES)
