"""Self-training's merge rule (issue 18): kept predictions and the previous pseudo-objects added back."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.detection.self_training import merge_round
from pipeline.masks import encode_rle


def _rect(y0, y1, x0, x1, size=(40, 40)):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def _obj(image_id, m, score=None, **kw):
    ys, xs = np.nonzero(m)
    a = {"image_id": image_id, "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                                       float(ys.max() + 1 - ys.min())], "segmentation": encode_rle(m), **kw}
    if score is not None:
        a["score"] = score
    return a


def test_kept_predictions_and_the_previous_objects_they_miss_by_hand():
    """Image 1: predictions A (0.9), B (0.75), C (0.6 < 0.7: dropped); previous objects P1 (= A: covered), P2 (IoU 0.4
    with B: added back), P3 (nowhere near: added back). Image 2: no prediction kept, its previous object stays."""
    A, B, C = _rect(0, 10, 0, 10), _rect(20, 30, 20, 30), _rect(0, 5, 30, 40)
    P2 = _rect(20, 30, 24, 34)                              # overlap 6x10 = 60, union 140: IoU 0.43
    preds = [_obj(1, C, 0.6), _obj(1, B, 0.75), _obj(1, A, 0.9), _obj(2, A, 0.3)]
    prev = [_obj(1, A, 0.5, id=1), _obj(1, P2, id=2), _obj(1, _rect(32, 38, 0, 6), id=3), _obj(2, B, id=4)]
    got = merge_round(preds, prev, score_threshold=0.7)
    assert [(a["image_id"], a["source"], a.get("score")) for a in got] == [
        (1, "prediction", 0.9), (1, "prediction", 0.75), (1, "previous", None), (1, "previous", None),
        (2, "previous", None)]
    assert [a["bbox"] for a in got if a["source"] == "previous"] == [prev[1]["bbox"], prev[2]["bbox"], prev[3]["bbox"]]
    assert all("id" not in a and a["category_id"] == 1 for a in got if a["source"] == "prediction")
    # the same rule at IoU 0.4: P2 (0.43) counts as found
    assert len(merge_round(preds, prev, score_threshold=0.7, iou_threshold=0.4)) == 4


def test_box_iou_without_masks_and_the_per_image_cap():
    preds = [{"image_id": 1, "bbox": [0, 0, 10, 10], "score": s} for s in (0.95, 0.9, 0.8)]
    prev = [{"image_id": 1, "bbox": [0, 0, 10, 9]}, {"image_id": 1, "bbox": [50, 50, 5, 5]}]  # IoU 0.9 / 0
    got = merge_round(preds, prev, score_threshold=0.7, max_per_image=2)
    assert [a.get("score") for a in got] == [0.95, 0.9, None] and got[-1]["bbox"] == [50, 50, 5, 5]
    assert merge_round([], prev, score_threshold=0.7) == [dict(a, source="previous") for a in prev]
    with pytest.raises(KeyError):
        merge_round([{"image_id": 1, "bbox": [0, 0, 1, 1]}], [], score_threshold=0.5)  # a prediction needs a score


def test_next_round_file_from_a_model(tmp_path):
    """A detector's predictions on the previous file's images become the next file: every image kept, each
    prediction above the threshold with its mask (RLE at the image's size) and area, the rest added back."""
    import torch
    from PIL import Image

    from pipeline.artifacts import coco_boxes_dataset
    from pipeline.detection.builders import build_detector
    from pipeline.detection.self_training import next_round
    from pipeline.masks import decode_rle

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    images = [{"id": i + 1, "file_name": f"im{i}.png", "width": 64, "height": 48} for i in range(2)]
    previous = coco_boxes_dataset(images, [{"image_id": 1, "bbox_xyxy": [2, 2, 30, 30], "score": 0.5,
                                            "segmentation": encode_rle(_rect(2, 30, 2, 30, (48, 64)))}])
    model = build_detector("mask_mobilenet_fpn", 1, min_size=48, max_size=64, score_thresh=0.0, seed=0)
    torch.manual_seed(0)
    nxt = next_round(model, previous, tmp_path, score_threshold=0.0, max_per_image=3)
    st = nxt["info"]["self_training"]
    assert nxt["images"] == images and st["prediction"] == 6 and st["previous"] + st["prediction"] == len(
        nxt["annotations"])
    for a in nxt["annotations"]:
        m = decode_rle(a["segmentation"])
        assert m.shape == (48, 64) and a["area"] == m.sum() and len(a["bbox"]) == 4
    assert next_round(model, previous, tmp_path, score_threshold=1.1)["annotations"][0]["source"] == "previous"
