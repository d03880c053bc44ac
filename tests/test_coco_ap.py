"""pipeline.evaluation.coco_ap: AP50/AP against hand-computed answers (COCO 101-point interpolation)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.records import ImageRecord
from pipeline.evaluation.coco_ap import build_coco_gt, evaluate_ap
from pipeline.evaluation.corloc import corloc_top1

A = [0.0, 0.0, 100.0, 100.0]
B = [200.0, 200.0, 300.0, 300.0]
C = [10.0, 10.0, 60.0, 60.0]


def _records(with_difficult: bool = False) -> list[ImageRecord]:
    recs = [ImageRecord("a", 1, "a.jpg", 400, 400, np.array([A]), ["cat"]),
            ImageRecord("b", 2, "b.jpg", 400, 400, np.array([B]), ["dog"])]
    if with_difficult:
        recs.append(ImageRecord("c", 3, "c.jpg", 400, 400, np.array([C]), ["cat"], np.array([True])))
    return recs


def _det(image_id, box, score, cat=1):
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


# d1 hits A exactly; d2 hits nothing; d3 overlaps B with IoU 6250 / 10000 = 0.625.
D1 = _det(1, A, 0.9)
D2 = _det(2, [350, 350, 380, 380], 0.8)
D3 = _det(2, [200, 200, 300, 262.5], 0.7)

# By hand: in score order TP, FP, TP -> (P, R) = (1, .5), (.5, .5), (2/3, 1). The 101 recall points
# 0.00..0.50 take the envelope 1.0, the 50 points 0.51..1.00 take 2/3.
AP50_HAND = (51 * 1.0 + 50 * 2 / 3) / 101 * 100
# IoU thresholds 0.65..0.95 (7 of 10): d3 becomes a FP, recall stops at .5 -> 51 points at 1.0.
AP_HAND = (3 * AP50_HAND + 7 * 51 / 101 * 100) / 10


def test_hand_computed_ap50_and_ap():
    out = evaluate_ap(_records(), [D1, D2, D3], mode="coco")
    assert out["AP50"] == pytest.approx(AP50_HAND, abs=1e-6)  # 83.498...
    assert out["AP"] == pytest.approx(AP_HAND, abs=1e-6)  # 60.396...
    assert out["num_gt"] == 2 and out["num_detections"] == 3 and out["num_images"] == 2
    assert "Average Precision" in out["summary"]


def test_perfect_and_empty_detections():
    assert evaluate_ap(_records(), [D1, _det(2, B, 0.5)])["AP50"] == pytest.approx(100.0)
    empty = evaluate_ap(_records(), [])
    assert empty["AP50"] == 0.0 and empty["AP"] == 0.0 and empty["summary"] == "no detections"


def test_voc_difficult_removed_or_ignored():
    d4 = _det(3, C, 0.95)  # the top detection lands on the difficult object
    # removed (reference): d4 is a FP first -> (0, 0), (.5, .5), (1/3, .5), (.5, 1): envelope 0.5 everywhere
    removed = evaluate_ap(_records(True), [d4, D1, D2, D3], mode="voc")
    assert removed["AP50"] == pytest.approx(50.0, abs=1e-6)
    assert removed["num_gt"] == 2
    # ignored: d4 neither TP nor FP -> the hand case above
    ignored = evaluate_ap(_records(True), [d4, D1, D2, D3], mode="voc", voc_difficult="ignore")
    assert ignored["AP50"] == pytest.approx(AP50_HAND, abs=1e-6)
    # COCO mode keeps the difficult box as a normal GT: d4 is a TP, 3 GT -> (1,1/3),(1,2/3),(2/3,2/3),(3/4,1)
    coco = evaluate_ap(_records(True), [d4, D1, D2, D3], mode="coco")
    assert coco["AP50"] == pytest.approx((67 * 1.0 + 34 * 0.75) / 101 * 100, abs=1e-6)


def test_class_aware_per_category():
    cat, dog = 1, 2
    dets = [_det(1, A, 0.9, cat), _det(2, [350, 350, 380, 380], 0.8, dog), _det(2, [200, 200, 300, 262.5], 0.7, dog)]
    out = evaluate_ap(_records(), dets, mode="coco", class_agnostic=False, class_names=["cat", "dog"],
                      per_category=True)
    assert out["per_category"]["cat"]["AP50"] == pytest.approx(100.0)
    assert out["per_category"]["dog"]["AP50"] == pytest.approx(50.0)  # FP then TP: precision 0.5 at recall 1
    assert out["AP50"] == pytest.approx(75.0)
    # the same boxes class-agnostically are the hand case
    assert evaluate_ap(_records(), dets, mode="coco")["AP50"] == pytest.approx(AP50_HAND, abs=1e-6)


def test_gt_conversion_and_errors():
    gt = build_coco_gt(_records(True), mode="voc")
    assert [a["bbox"] for a in gt["annotations"]] == [[0, 0, 100, 100], [200, 200, 100, 100]]
    gt = build_coco_gt(_records(True), mode="voc", voc_difficult="ignore")
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1]
    with pytest.raises(ValueError, match="not in the evaluated dataset"):
        evaluate_ap(_records(), [_det(99, A, 0.5)])
    with pytest.raises(ValueError, match="ground truth"):
        evaluate_ap([ImageRecord("x", 1, "x.jpg", has_gt=False)], [])
    with pytest.raises(ValueError, match="mode"):
        evaluate_ap(_records(), [], mode="pascal")


def test_corloc_top1_uses_best_scoring_box():
    recs = _records() + [ImageRecord("c", 3, "c.jpg", 400, 400, np.array([C]), ["cat"])]
    dets = [
        {"image_id": 1, "boxes": np.array([[300, 300, 390, 390], A]), "scores": np.array([0.2, 0.9]), "labels": np.array([1, 1])},
        {"image_id": 2, "boxes": np.array([B, [0, 0, 5, 5]]), "scores": np.array([0.1, 0.8]), "labels": np.array([1, 1])},
        {"image_id": 3, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)},
    ]
    res = corloc_top1(dets, recs)
    assert (res.hits, res.total) == (1, 3)  # a: hit; b: top box misses; c: no detection = miss
    assert res.per_image == {"a": True, "b": False, "c": False}
    with pytest.raises(ValueError, match="no detections entry"):
        corloc_top1(dets[:2], recs)
