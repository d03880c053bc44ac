"""Acceptance 1: a detector trained from random init on a few voc07-mini images' GT boxes (as
class-agnostic pseudo-boxes) learns them: the loss falls and AP50 on those images becomes clearly
non-trivial; with the boxes moved to random places it does not.

Numbers seen on the 2-core CPU machine (deterministic on CPU): fast test (4 images, 128 px,
100 iterations) AP50 28.2; slow test (8 images, 160 px, 250 iterations) AP50 53.8 with the GT boxes
vs 9.7 with shuffled boxes.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.artifacts import coco_boxes_dataset
from pipeline.detection.builders import build_detector
from pipeline.detection.data import DetectionDataset
from pipeline.detection.inference import predict, to_coco_results
from pipeline.evaluation.coco_ap import evaluate_ap


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(voc07_mini, n):
    from pipeline.data import build_dataset

    return build_dataset("voc07", str(voc07_mini), max_images=n).records


def _as_pseudo_boxes(records, shuffle_seed: int | None = None) -> dict:
    """The GT boxes as a class-agnostic pseudo-box file; ``shuffle_seed`` moves each box (same size)
    to a uniformly random place inside its image."""
    rng = np.random.default_rng(shuffle_seed)
    images, anns = [], []
    for r in records:
        images.append({"id": r.coco_id, "file_name": r.path, "width": r.width, "height": r.height})
        for b in r.boxes:
            if shuffle_seed is not None:
                w, h = b[2] - b[0], b[3] - b[1]
                x, y = rng.uniform(0, r.width - w), rng.uniform(0, r.height - h)
                b = np.array([x, y, x + w, y + h])
            anns.append({"image_id": r.coco_id, "bbox_xyxy": b})
    return coco_boxes_dataset(images, anns)


def _train_and_score(records, tmp_path, *, size, iterations, lr, shuffle_seed=None):
    from pipeline.detection.trainer import train

    ds = DetectionDataset(_as_pseudo_boxes(records, shuffle_seed), image_root=None)
    model = build_detector("mobilenet_fpn", 1, min_size=size, max_size=int(size * 1.34), batch_size_per_image=64,
                           rpn_topk=(600, 300, 300, 100), seed=0)
    res = train(model, ds, out_dir=tmp_path, iterations=iterations, batch_size=2, lr=lr, warmup_iters=20,
                steps=(int(iterations * 0.8),), checkpoint_period=10**6, seed=0, progress=False)
    dets = predict(model, records, batch_size=4)
    ap = evaluate_ap(records, to_coco_results(dets), mode="coco")  # every GT box, as trained on
    return res.losses, ap["AP50"]


def test_overfit_a_few_images_fast(voc07_mini, tmp_path):
    losses, ap50 = _train_and_score(_records(voc07_mini, 4), tmp_path, size=128, iterations=100, lr=0.04)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses
    assert ap50 > 15.0  # random weights give ~0-1


@pytest.mark.slow
def test_overfit_gt_boxes_vs_shuffled_boxes(voc07_mini, tmp_path):
    records = _records(voc07_mini, 8)
    kw = dict(size=160, iterations=250, lr=0.02)
    losses, ap50 = _train_and_score(records, tmp_path / "gt", **kw)
    _, ap50_shuffled = _train_and_score(records, tmp_path / "shuffled", shuffle_seed=0, **kw)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert ap50 > 35.0, ap50
    assert ap50_shuffled < 20.0 and ap50 > 2.5 * ap50_shuffled, (ap50, ap50_shuffled)


def test_the_mask_head_learns_the_masks_of_a_few_images(coco_tiny, tmp_path):
    """mask_mobilenet_fpn on 3 COCO images' GT boxes and masks (as class-agnostic pseudo-masks): the mask loss
    falls, and the trained detector predicts a mask (RLE at the image's size) with every box."""
    import json

    from pipeline.data import build_dataset
    from pipeline.detection.trainer import train
    from pipeline.masks import decode_rle

    records = [r for r in build_dataset("coco", str(coco_tiny), max_images=6).records if r.has_masks][:3]
    images = [{"id": r.coco_id, "file_name": r.path, "width": r.width, "height": r.height} for r in records]
    anns = [{"image_id": r.coco_id, "bbox_xyxy": b, "segmentation": s}
            for r in records for b, s, c in zip(r.boxes, r.segmentations, r.crowd) if s is not None and not c]
    ds = DetectionDataset(coco_boxes_dataset(images, anns), image_root=None, masks=True)
    model = build_detector("mask_mobilenet_fpn", 1, min_size=128, max_size=172, batch_size_per_image=64,
                           rpn_topk=(600, 300, 300, 100), seed=0)
    train(model, ds, out_dir=tmp_path, iterations=40, batch_size=2, lr=0.02, warmup_iters=5, steps=(35,),
          checkpoint_period=10**6, log_period=1, seed=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mask_losses = [line["loss_mask"] for line in log]
    assert np.mean(mask_losses[-5:]) < 0.75 * np.mean(mask_losses[:5]), mask_losses
    dets = predict(model, records, batch_size=2)
    d = next(d for d in dets if len(d["scores"]))
    assert len(d["masks"]) == len(d["scores"])
    r = next(r for r in records if r.coco_id == d["image_id"])
    assert decode_rle(d["masks"][0]).shape == (r.height, r.width)
    assert "segmentation" in to_coco_results(dets)[0]
