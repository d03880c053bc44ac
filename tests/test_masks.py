"""Pseudo-masks (issue 17): RLE, patch masks as pixels, each miner's mask in the journal row, mask AP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.records import ImageRecord
from pipeline.discovery import boxes_of
from pipeline.discovery.dinoseg import dinoseg
from pipeline.discovery.found import found
from pipeline.discovery.lost import lost
from pipeline.discovery.maskcut import maskcut
from pipeline.discovery.tokencut import tokencut
from pipeline.evaluation.coco_ap import evaluate_ap
from pipeline.masks import (decode_rle, encode_rle, patch_mask_to_pixels, rle_area, segmentation_problem,
                            to_rle)
from pipeline.mining import make_row


def test_rle_round_trip_and_area():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 13), (480, 640)):
        m = rng.random(shape) > 0.6
        rle = encode_rle(m)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), m)
        assert rle_area(rle) == int(m.sum())
    empty = encode_rle(np.zeros((5, 4), bool))
    assert rle_area(empty) == 0 and not decode_rle(empty).any()


def test_patch_mask_becomes_clipped_blocks_by_hand():
    mask = np.array([[1, 0, 0],
                     [0, 0, 1]], bool)
    got = patch_mask_to_pixels(mask, 2, (3, 5))  # the last row/column of blocks is cut by the image
    want = np.array([[1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 0, 0, 1]], bool)
    assert np.array_equal(got, want)
    # a grid that does not reach the image's edge (cropped features): the rest is background
    assert np.array_equal(patch_mask_to_pixels(np.ones((1, 1), bool), 2, (3, 3)),
                          np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool))
    # resized back to the original by nearest neighbour at pixel centres: 2 x 4 seen -> 4 x 8 original
    small = np.array([[1, 0], [0, 1]], bool)
    up = patch_mask_to_pixels(small, 2, (2, 4), (4, 8))
    assert np.array_equal(up, np.kron(np.array([[1, 1, 0, 0]], bool), np.ones((4, 2), bool)))


def _features(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Planted features: a blob of similar patches on a background, plus noise."""
    rng = np.random.default_rng(seed)
    f = rng.normal(0, 0.3, (h * w, 16)).astype(np.float32)
    blob = np.zeros((h, w), bool)
    blob[1:4, 2:6] = True
    f[blob.ravel()] += 2.0
    f[~blob.ravel(), 0] += 1.0
    return torch.from_numpy(f)


MINERS = {
    "lost": lambda f, dims, p, size: lost(f, dims, p, size, k_patches=5),
    "tokencut": lambda f, dims, p, size: tokencut(f, dims, p, size, max_boxes=2),
    "maskcut": lambda f, dims, p, size: maskcut(f, dims, p, size, num_objects=3),
    "dinoseg": lambda f, dims, p, size: dinoseg(torch.stack([f[:, 0].abs()] * 2), dims, p, size, head=1),
    "found": lambda f, dims, p, size: found(f, torch.stack([f[:, 0].abs(), f[:, 1].abs()]), dims, p, size,
                                            head="none", mode="multi"),
}


@pytest.mark.parametrize("name", sorted(MINERS))
def test_each_miner_writes_the_patch_mask_it_computed(name):
    h, w, p = 6, 8, 4
    size = (h * p - 3, w * p - 1)  # the unpadded image ends inside the last patches
    result = MINERS[name](_features(h, w), (h, w), p, size)
    rec = ImageRecord("x", 1, "x.png", width=size[1], height=size[0], has_gt=False)
    row = make_row(rec, size, result, None, patch_size=p)
    mined = boxes_of(result)
    assert len(row["masks"]) == len(row["boxes"]) == len(mined) >= 1
    for rle, box, mb in zip(row["masks"], row["boxes"], mined):
        pixels = decode_rle(rle)
        want = np.kron(mb.mask.astype(np.uint8), np.ones((p, p), np.uint8))[:size[0], :size[1]].astype(bool)
        assert pixels.shape == size and np.array_equal(pixels, want)
        ys, xs = np.nonzero(pixels)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box  # the box is the mask's extent


def test_masks_of_a_resized_image_are_at_the_original_size():
    h, w, p = 6, 8, 4
    result = lost(_features(h, w), (h, w), p, (h * p, w * p), k_patches=5)
    rec = ImageRecord("x", 1, "x.png", has_gt=False)
    row = make_row(rec, (h * p, w * p), result, None, (h * p * 2, w * p * 2), patch_size=p)
    assert decode_rle(row["masks"][0]).shape == (h * p * 2, w * p * 2)
    assert make_row(rec, (h * p, w * p), result, None).get("masks") is None  # no patch size: boxes only


# ------------------------------------------------------------------------------------------------ mask AP
def _gt(masks: list[np.ndarray]) -> ImageRecord:
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    H, W = masks[0].shape
    return ImageRecord("1", 1, "a.png", width=W, height=H, boxes=boxes, classes=["a"] * len(masks),
                       segmentations=[encode_rle(m) for m in masks])


def _rect(H, W, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _det(m: np.ndarray, score: float) -> dict:
    ys, xs = np.nonzero(m)
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": encode_rle(m),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]}


def test_mask_ap_of_gt_against_itself_is_100_and_of_nothing_is_0():
    gts = [_rect(40, 50, 2, 20, 3, 30), _rect(40, 50, 25, 38, 10, 45)]
    rec = _gt(gts)
    res = evaluate_ap([rec], [_det(m, 0.9) for m in gts], mode="coco", iou_type="segm")
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert evaluate_ap([rec], [], mode="coco", iou_type="segm")["AP"] == 0.0


def test_mask_ap_hand_computed_and_equal_to_pycocotools_directly():
    """GT 1 found exactly (score 0.9); GT 2 by a mask of IoU 5/8 (score 0.8): a hit at the IoU thresholds
    0.50, 0.55, 0.60; at the other 7 a false positive after one hit of two, so precision 1 up to recall 0.5:
    51 of COCO's 101 recall points."""
    H, W = 40, 40
    g1 = _rect(H, W, 0, 10, 0, 10)
    g2 = _rect(H, W, 20, 36, 20, 30)               # 160 px
    p2 = _rect(H, W, 20, 30, 20, 30)               # 100 px inside it: IoU 100 / 160 = 5/8
    want_ap = (3 * 1.0 + 7 * 51 / 101) / 10 * 100
    res = evaluate_ap([_gt([g1, g2])], [_det(g1, 0.9), _det(p2, 0.8)], mode="coco", iou_type="segm")
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(51 / 101 * 100)
    assert res["AP"] == pytest.approx(want_ap)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": W, "height": H}], "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                   "segmentation": encode_rle(m), "area": float(m.sum()), "bbox": [0, 0, 1, 1]}
                                  for i, m in enumerate((g1, g2))]}
    gt.createIndex()
    dt = gt.loadRes([{k: v for k, v in _det(m, s).items() if k != "bbox"} for m, s in ((g1, 0.9), (p2, 0.8))])
    ev = COCOeval(gt, dt, iouType="segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert res["AP"] == pytest.approx(ev.stats[0] * 100) and res["AR100"] == pytest.approx(ev.stats[8] * 100)


def test_mask_ap_refuses_gt_without_masks_and_detections_without_masks():
    rec = ImageRecord("1", 1, "a.png", width=10, height=10, boxes=[[0, 0, 5, 5]], classes=["a"])
    with pytest.raises(ValueError, match="ground-truth masks"):
        evaluate_ap([rec], [], mode="coco", iou_type="segm")
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_ap([_gt([_rect(10, 10, 0, 5, 0, 5)])], [{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}],
                    mode="coco", iou_type="segm")


# ------------------------------------------------------------------------------------ given segmentations
@pytest.mark.parametrize("seg, problem", [
    ({"size": [10, 12], "counts": encode_rle(np.ones((10, 12), bool))["counts"]}, "RLE of size [10, 12]"),
    ({"size": [12, 10], "counts": "zzz"}, "broken RLE counts"),
    ({"size": [12, 10], "counts": [5, 6]}, "do not sum"),
    ([[0, 0, 5, 5]], "fewer than three points"),
    ([], "empty polygon list"),
    ("a string", "neither polygons nor RLE"),
])
def test_segmentation_problems_are_named(seg, problem):
    assert problem in segmentation_problem(seg, 12, 10)


def test_usable_segmentations_become_the_same_rle():
    m = _rect(12, 10, 2, 6, 3, 8)
    rle = encode_rle(m)
    poly = [[3, 2, 8, 2, 8, 6, 3, 6]]
    for seg in (rle, poly):
        assert segmentation_problem(seg, 12, 10) is None
    assert np.array_equal(decode_rle(to_rle(rle, 12, 10)), m)
    assert decode_rle(to_rle(poly, 12, 10)).sum() == pytest.approx(m.sum(), abs=10)  # polygon rasterisation
    fortran = np.asfortranarray(m.astype(np.uint8)).ravel(order="F")
    counts, last, run = [], False, 0
    for v in fortran:
        if bool(v) != last:
            counts.append(run)
            last, run = bool(v), 0
        run += 1
    counts.append(run)
    assert np.array_equal(decode_rle(to_rle({"size": [12, 10], "counts": counts}, 12, 10)), m)


def test_compressed_rle_text_is_read_as_pycocotools_writes_it():
    from pipeline.masks import _string_runs

    rng = np.random.default_rng(1)
    for _ in range(100):
        m = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) > rng.random()
        runs = _string_runs(encode_rle(m)["counts"])
        flat = np.concatenate([np.full(n, k % 2, bool) for k, n in enumerate(runs)])
        assert np.array_equal(flat, m.ravel(order="F"))


# ------------------------------------------------------------------------------------------------- CRF
def test_crf_keeps_a_refined_mask_close_to_the_cut_and_drops_one_that_moved():
    from pipeline.masks import refine_or_drop

    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True                                   # 50 px
    near = mask.copy()
    near[:, 5] = True                                    # IoU 50/60
    far = np.zeros((10, 10), bool)
    far[:, 3:9] = True                                   # IoU 20/90
    assert refine_or_drop(None, mask, refine=lambda _img, _m: near) is near
    assert refine_or_drop(None, mask, refine=lambda _img, _m: far) is None


def test_a_row_drops_the_objects_the_crf_rejects(monkeypatch):
    import pipeline.masks as masks

    h, w, p = 6, 8, 4
    result = tokencut(_features(h, w), (h, w), p, (h * p, w * p), max_boxes=2)
    assert len(boxes_of(result)) == 2
    calls = []

    def fake(image, mask):                               # the first object kept as is, the second moved away
        calls.append(image.shape)
        return mask if len(calls) == 1 else ~mask

    monkeypatch.setattr(masks, "crf_refine", fake)
    rec = ImageRecord("x", 1, "x.png", has_gt=False)
    image = torch.zeros(3, h * p, w * p)
    row = make_row(rec, (h * p, w * p), result, None, patch_size=p, image=image)
    assert calls == [(h * p, w * p, 3)] * 2                # the de-normalised network input, per object
    assert len(row["boxes"]) == len(row["masks"]) == 1 and row["crf_dropped"] == 1
    assert row["boxes"][0] == list(boxes_of(result)[0].box)


def test_crf_without_its_package_is_one_config_error(monkeypatch):
    import pipeline.discovery.miners as miners
    from stage_utils import compose_cfg
    from stages.checks import config_errors

    monkeypatch.setattr(miners, "crf_available", lambda: False)
    errors = config_errors(compose_cfg("mine", ["miner=maskcut", "miner.crf=true"]), "mine")
    assert len(errors) == 1 and errors[0].startswith("miner.crf=true: ") and "pip install pydensecrf2" in errors[0]


@pytest.mark.skipif(not __import__("pipeline.masks", fromlist=["x"]).crf_available(),
                    reason="pydensecrf2 is not installed (optional: pip install pydensecrf2)")
def test_the_dense_crf_snaps_a_blocky_mask_to_the_colour_edge():
    from pipeline.masks import crf_refine

    image = np.zeros((48, 48, 3), np.uint8)
    image[:, :20] = (220, 40, 40)                        # the object: the red left part
    image[:, 20:] = (40, 40, 220)
    truth = np.zeros((48, 48), bool)
    truth[:, :20] = True
    blocky = np.zeros((48, 48), bool)
    blocky[:, :24] = True                                # a patch-16-ish mask, 4 px too wide
    refined = crf_refine(image, blocky)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()     # noqa: E731
    assert iou(refined, truth) > iou(blocky, truth) and iou(refined, truth) > 0.95
