"""CorLoc as LOST scores it: the published 63.33 % on voc07-mini, and hand-computed cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.boxes import iou_matrix
from pipeline.data import build_dataset
from pipeline.data.records import ImageRecord
from pipeline.evaluation.corloc import CorLocResult, corloc


def test_published_lost_boxes_on_voc07_mini(voc07_mini):
    ds = build_dataset("voc07", str(voc07_mini))
    preds = json.loads((voc07_mini / "lost_reference_boxes.json").read_text())
    res = corloc({k: np.array(v) for k, v in preds.items()}, ds.records)
    assert (res.hits, res.total) == (38, 60)
    assert round(res.corloc, 2) == 63.33 and str(res) == "corloc: 63.33 (38/60)"
    assert sum(res.per_image.values()) == 38 and len(res.ious) == 60 and res.skipped == []
    assert all((res.ious[k] >= 0.5) == res.per_image[k] for k in res.per_image)


def test_hand_computed_cases():
    recs = [
        ImageRecord("a", 1, "a.jpg", boxes=[[0, 0, 10, 10]], classes=["x"]),
        # only a difficult box: it still counts as GT
        ImageRecord("b", 2, "b.jpg", boxes=[[0, 0, 10, 10]], classes=["x"], difficult=[True]),
        # crowd box dropped: the prediction equal to it misses, the one matching the other box hits
        ImageRecord("c", 3, "c.jpg", boxes=[[0, 0, 100, 100], [50, 50, 60, 60]], classes=["x", "y"],
                    crowd=[True, False]),
        ImageRecord("d", 4, "d.jpg", boxes=[[0, 0, 10, 10]], classes=["x"]),  # no prediction: a miss
        ImageRecord("e", 5, "e.jpg", boxes=[[0, 0, 10, 10]], classes=["x"]),  # None (corrupt image): a miss
        ImageRecord("f", 6, "f.jpg", boxes=[[0, 0, 10, 10]], classes=["x"], crowd=[True]),  # crowd only: skipped
        ImageRecord("g", 7, "g.jpg"),  # no annotated object: skipped
        ImageRecord("h", 8, "h.jpg", has_gt=False),  # unlabelled: skipped
    ]
    preds = {
        "a": np.array([0, 0, 5, 10]),        # IoU exactly 0.5: a hit
        "b": np.array([[0, 0, 10, 10]]),     # (1, 4) accepted
        "c": np.array([0, 0, 100, 100]),
        "e": None,
        "f": np.array([0, 0, 10, 10]),
        "h": np.array([0, 0, 1, 1]),
    }
    res = corloc(preds, recs)
    assert res.per_image == {"a": True, "b": True, "c": False, "d": False, "e": False}
    assert (res.hits, res.total) == (2, 5) and res.corloc == pytest.approx(40.0)
    assert res.ious["a"] == 0.5 and res.ious["d"] == 0.0 and res.ious["e"] == 0.0
    assert res.ious["c"] == pytest.approx(0.01)  # vs the 10 x 10 non-crowd box only
    assert res.skipped == ["f", "g", "h"]
    preds["c"] = np.array([50, 50, 60, 60])
    assert corloc(preds, recs).per_image["c"] is True
    # threshold is a parameter, >= inclusive
    assert corloc({"a": np.array([0, 0, 6, 10])}, recs[:1], iou_threshold=0.6).hits == 1
    assert corloc({"a": np.array([0, 0, 5.9, 10])}, recs[:1], iou_threshold=0.6).hits == 0


def test_gt_rounded_like_the_reference():
    # COCO-like GT x=0.5, w=9.5: LOST rounds with Python's round(): [0, 0, 10, 10] (half to even).
    # Unrounded the IoU with [0, 0, 5, 10] is 45/100 (a miss); rounded it is 50/100 (a hit).
    rec = ImageRecord("r", 1, "r.jpg", boxes=[[0.5, 0, 10.0, 10]], classes=["x"])
    assert iou_matrix([[0, 0, 5, 10]], rec.boxes)[0, 0] == pytest.approx(0.45)
    res = corloc({"r": np.array([0, 0, 5, 10])}, [rec])
    assert res.hits == 1 and res.ious["r"] == 0.5


def test_nothing_with_gt_and_bad_inputs():
    res = corloc({}, [ImageRecord("x", 1, "x.jpg", has_gt=False)])
    assert isinstance(res, CorLocResult) and res.corloc is None and res.total == 0 and "n/a" in str(res)
    recs = [ImageRecord("000005", 5, "a.jpg", boxes=[[0, 0, 1, 1]], classes=["x"])]
    with pytest.raises(ValueError, match="no prediction key matches.*5"):
        corloc({5: np.array([0, 0, 1, 1])}, recs)
    with pytest.raises(ValueError, match="one box per image"):
        corloc({"000005": np.zeros((2, 4))}, recs)


def test_coco_tiny_crowd_boxes_dropped(coco_tiny):
    ds = build_dataset("coco", str(coco_tiny))
    # the first image with a crowd box whose crowd box overlaps no ordinary box at IoU >= 0.5
    for rec in ds.records:
        if not rec.crowd.any():
            continue
        crowd_box = rec.boxes[rec.crowd][0]
        normal = rec.boxes[~rec.crowd]
        if len(normal) and iou_matrix([crowd_box], np.round(normal)).max() < 0.5:
            break
    else:
        pytest.fail("coco-tiny should hold an image with a crowd box")
    miss = corloc({rec.image_id: crowd_box}, [rec])
    assert miss.per_image == {rec.image_id: False} and miss.corloc == 0.0
    hit = corloc({rec.image_id: normal[0]}, [rec])  # unrounded COCO floats: still IoU >= 0.5 vs rounded GT
    assert hit.per_image == {rec.image_id: True} and hit.corloc == 100.0
    # the whole set: no prediction at all -> every image with non-crowd GT is a miss in the denominator
    res = corloc({rec.image_id: normal[0]}, ds.records)
    assert res.hits == 1 and res.total == sum(1 for r in ds.records if (~r.crowd).any())


def test_top1_box_is_the_first_of_equal_top_scores_and_none_is_a_miss():
    from pipeline.evaluation.corloc import corloc_top1, top1_boxes

    dets = [{"image_id": 1, "boxes": np.array([[0, 0, 5, 5], [0, 0, 10, 10], [2, 2, 8, 8]], float),
             "scores": np.array([0.2, 0.7, 0.7])},
            {"image_id": 2, "boxes": np.zeros((0, 4)), "scores": np.zeros(0)}]
    top = top1_boxes(dets)
    np.testing.assert_array_equal(top[1], [0, 0, 10, 10])  # the first of the two 0.7s
    assert top[2] is None
    recs = [ImageRecord("a", 1, "a.jpg", boxes=[[0, 0, 10, 10]], classes=["x"]),
            ImageRecord("b", 2, "b.jpg", boxes=[[0, 0, 10, 10]], classes=["x"])]
    res = corloc_top1(dets, recs)
    assert res.per_image == {"a": True, "b": False} and (res.hits, res.total) == (1, 2)


def test_score_detections_counts_everything_and_scores_the_images_with_gt():
    from pipeline.evaluation.detections import ap_mode, score_detections

    recs = [ImageRecord("a", 1, "a.jpg", 20, 20, boxes=[[0, 0, 10, 10]], classes=["x"]),
            ImageRecord("b", 2, "b.jpg", 20, 20, has_gt=False)]
    dets = [{"image_id": 1, "boxes": np.array([[0, 0, 10, 10]], float), "scores": np.array([0.9]), "labels": [1]},
            {"image_id": 2, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": []}]
    m = score_detections(dets, recs, mode="voc")
    assert (m["images"], m["detections"], m["images_without_detections"], m["gt_images"]) == (2, 1, 1, 1)
    assert m["corloc"] == 100.0 and m["AP50"] == pytest.approx(100.0) and m["ap_mode"] == "voc"
    none = score_detections(dets[1:], recs[1:])
    assert none["corloc"] is None and none["AP50"] is None and none["ap_mode"] is None
    assert ap_mode("voc07") == "voc" and ap_mode("coco") == "coco"
