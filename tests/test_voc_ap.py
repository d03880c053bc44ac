"""VOC AP: hand-computed cases, difficult boxes, the strict threshold, and the devkit's +1 arithmetic."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.records import ImageRecord
from pipeline.evaluation.voc_ap import ap_from_pr, voc_ap


def rec(image_id, boxes, classes, difficult=None, coco_id=0):
    return ImageRecord(image_id, coco_id, f"{image_id}.jpg", 100, 100, np.asarray(boxes, float).reshape(-1, 4),
                       list(classes), np.asarray(difficult if difficult is not None else [False] * len(classes)))


def dets(boxes, scores, labels=None):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels if labels is not None else [1] * len(scores))}


A, B = [0, 0, 10, 10], [50, 50, 70, 80]


def test_duplicate_and_miss_hand_computed():
    gt = [rec("1", [A, B], ["cat", "cat"])]
    d = {"1": dets([A, A, [30, 30, 40, 40], B], [0.9, 0.8, 0.7, 0.6])}
    # TP, FP (duplicate), FP (no overlap), TP: rec .5 .5 .5 1, prec 1 .5 .33 .5
    # area = 0.5 * 1 + 0.5 * 0.5
    assert voc_ap(gt, d, "cat") == pytest.approx(0.75)
    # 11-point: recall >= 0..0.5 -> 1 (6 points), 0.6..1 -> 0.5 (5 points)
    assert voc_ap(gt, d, "cat", use_07_metric=True) == pytest.approx(8.5 / 11)


def test_difficult_ground_truth_is_ignored():
    gt = [rec("1", [A, B], ["cat", "cat"], difficult=[False, True])]
    d = {"1": dets([B, A], [0.9, 0.8])}
    assert voc_ap(gt, d, "cat") == pytest.approx(1.0)   # B hits a difficult box: neither TP nor FP
    gt_all = [rec("1", [A, B], ["cat", "cat"])]
    assert voc_ap(gt_all, d, "cat") == pytest.approx(1.0)
    d_miss = {"1": dets([[30, 30, 40, 40], A], [0.9, 0.8])}
    assert voc_ap(gt, d_miss, "cat") == pytest.approx(0.5)   # FP first, then TP: prec 0.5 at recall 1


def test_best_gt_already_taken_is_a_false_positive():
    gt = [rec("1", [[0, 0, 10, 10], [8, 0, 18, 10]], ["dog", "dog"])]
    # second detection overlaps the first GT best (0.82) and the free second one too little (0.18)
    d = {"1": dets([[0, 0, 10, 10], [1, 0, 11, 10], [8, 0, 18, 10]], [0.9, 0.8, 0.7])}
    # TP, FP, TP: rec .5 .5 1, prec 1 .5 .667
    assert voc_ap(gt, d, "dog") == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_equal_iou_goes_to_the_first_gt_as_numpy_argmax():
    # the detection overlaps both GT boxes equally (IoU 0.905); the devkit takes the first, difficult one
    gt = [rec("1", [[0, 0, 10, 10], [1, 0, 11, 10]], ["cat", "cat"], difficult=[True, False])]
    d = {"1": dets([[0.5, 0, 10.5, 10]], [0.9])}
    assert voc_ap(gt, d, "cat") == 0.0            # ignored, the free box is never found
    gt_swapped = [rec("1", [[1, 0, 11, 10], [0, 0, 10, 10]], ["cat", "cat"], difficult=[False, True])]
    assert voc_ap(gt_swapped, d, "cat") == pytest.approx(1.0)


def test_threshold_is_strict_and_labels_and_classes_filter():
    gt = [rec("1", [[0, 0, 10, 10]], ["cat"]), rec("2", [[0, 0, 10, 10]], ["dog"])]
    half = [0, 0, 10, 20]                           # IoU exactly 0.5
    d = {"1": dets([half, [0, 0, 10, 10]], [0.9, 0.8], labels=[1, 2])}
    assert voc_ap(gt, d, "cat", label=1) == 0.0
    assert voc_ap(gt, d, "cat", label=1, iou_threshold=0.49) == pytest.approx(1.0)
    assert voc_ap(gt, d, "cat", label=2) == pytest.approx(1.0)
    assert voc_ap(gt, d, "cat") == pytest.approx(0.5)  # both labels: FP then TP
    assert voc_ap(gt, d, "dog") == 0.0                 # right box, wrong image
    assert np.isnan(voc_ap(gt, d, "bird"))             # no GT of that class: undefined
    with pytest.raises(ValueError, match="not in the ground truth"):
        voc_ap(gt, {"9": dets([A], [1.0])}, "cat")


def test_ap_from_pr_envelope():
    # precision rises after a dip: the envelope takes the later, higher value
    assert ap_from_pr(np.array([0.25, 0.25, 0.5, 1.0]), np.array([1.0, 0.5, 0.67, 0.8])) == pytest.approx(
        0.25 * 1.0 + 0.25 * 0.8 + 0.5 * 0.8)


def devkit_ap(gt_records, det_list, cls, thr):
    """Naive transcription of the VOC devkit protocol on integer VOC boxes (+1 widths, 1-based)."""
    npos, R = 0, {}
    for r in gt_records:
        m = [i for i, c in enumerate(r.classes) if c == cls]
        bb = np.array([[r.boxes[i][0] + 1, r.boxes[i][1] + 1, r.boxes[i][2], r.boxes[i][3]] for i in m]).reshape(-1, 4)
        diff = np.array([r.difficult[i] for i in m], bool)
        npos += int((~diff).sum())
        R[r.image_id] = {"bbox": bb, "difficult": diff, "det": [False] * len(m)}
    conf = np.array([d[1] for d in det_list])
    order = np.argsort(-conf, kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for n, o in enumerate(order):
        im, _, box = det_list[o]
        bb = np.array([box[0] + 1, box[1] + 1, box[2], box[3]])   # the reference's xmin/ymin + 1
        g = R[im]
        ovmax, jmax = -np.inf, -1
        if g["bbox"].size:
            iw = np.maximum(np.minimum(g["bbox"][:, 2], bb[2]) - np.maximum(g["bbox"][:, 0], bb[0]) + 1, 0)
            ih = np.maximum(np.minimum(g["bbox"][:, 3], bb[3]) - np.maximum(g["bbox"][:, 1], bb[1]) + 1, 0)
            inter = iw * ih
            uni = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                   + (g["bbox"][:, 2] - g["bbox"][:, 0] + 1) * (g["bbox"][:, 3] - g["bbox"][:, 1] + 1) - inter)
            ov = inter / uni
            ovmax, jmax = ov.max(), ov.argmax()
        if ovmax > thr:
            if not g["difficult"][jmax]:
                if not g["det"][jmax]:
                    tp[n], g["det"][jmax] = 1, True
                else:
                    fp[n] = 1
        else:
            fp[n] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec_, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec, mpre = np.concatenate(([0.0], rec_, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("thr", [0.5, 0.75])
def test_matches_naive_devkit_on_random_scenes(thr):
    rng = np.random.default_rng(42)
    classes = ["a", "b"]
    records, det_list, det_map = [], [], {}
    for i in range(30):
        n = rng.integers(0, 4)
        x1, y1 = rng.integers(1, 60, n), rng.integers(1, 60, n)
        x2, y2 = x1 + rng.integers(5, 40, n), y1 + rng.integers(5, 40, n)
        voc = np.stack([x1, y1, x2, y2], 1)                   # integer VOC boxes (1-based, inclusive)
        boxes = np.stack([x1 - 1, y1 - 1, x2, y2], 1)         # our records: xmin/ymin - 1
        records.append(rec(str(i), boxes, [classes[c] for c in rng.integers(0, 2, n)],
                           difficult=rng.random(n) < 0.2))
        m = rng.integers(0, 6)
        src = voc[rng.integers(0, n, m)] if n else rng.integers(1, 60, (m, 4))
        jit = src + rng.normal(0, 3, (m, 4)).round(1)
        db = np.stack([jit[:, 0] - 1, jit[:, 1] - 1, np.maximum(jit[:, 2], jit[:, 0] + 1),
                       np.maximum(jit[:, 3], jit[:, 1] + 1)], 1).reshape(-1, 4)
        sc = rng.random(m).round(2)                           # rounded: some ties
        det_map[str(i)] = dets(db, sc)
        det_list += [(str(i), s, b) for b, s in zip(db, sc)]
    for cls in classes:
        assert voc_ap(records, det_map, cls, iou_threshold=thr) == pytest.approx(
            devkit_ap(records, det_list, cls, thr), abs=1e-12)


def test_real_voc_ground_truth_as_detections_gives_100(voc07_mini):
    from pipeline.data import build_dataset

    ds = build_dataset("voc07", str(voc07_mini / "VOCdevkit"))
    cidx = {c: i for i, c in enumerate(ds.class_names)}
    d = {r.image_id: dets(r.boxes, np.linspace(1, 0.5, len(r.boxes)), [cidx[c] for c in r.classes])
         for r in ds.records if len(r.boxes)}
    present = sorted({c for r in ds.records for c, df in zip(r.classes, r.difficult) if not df})
    assert len(present) >= 10
    for cls in present:
        assert voc_ap(ds.records, d, cls, label=cidx[cls]) == pytest.approx(1.0)
    # all classes' boxes scored as "person": the other classes' boxes are false positives
    assert voc_ap(ds.records, d, "person") < 1.0
