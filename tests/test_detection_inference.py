"""pipeline.detection.inference: running a detector over images, COCO results export, top-1 boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.records import ImageRecord
from pipeline.detection.inference import image_list, predict, to_coco_results
from pipeline.evaluation.corloc import top1_boxes


class _FixedDetector(nn.Module):
    """Stands in for a torchvision detector: two boxes per image, scaled to the image it was given."""

    def forward(self, images):
        assert not self.training, "predict must put the model in eval mode"
        out = []
        for im in images:
            h, w = im.shape[-2:]
            out.append({"boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2], [1.0, 2.0, w, h]]),
                        "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 2])})
        return out


def _images(tmp_path, sizes=((40, 30), (20, 10), (16, 16))):
    recs = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
        recs.append(ImageRecord(f"im{i}", 10 + i, str(tmp_path / f"{i}.png"), w, h))
    return recs


def test_predict_keeps_order_and_ids_and_exports_coco(tmp_path):
    recs = _images(tmp_path)
    model = _FixedDetector().train()
    dets = predict(model, recs, batch_size=2)
    assert [d["image_id"] for d in dets] == [10, 11, 12]
    np.testing.assert_allclose(dets[0]["boxes"], [[0, 0, 20, 15], [1, 2, 40, 30]])
    res = to_coco_results(dets[:1], category_ids=[5, 9])
    assert res == [{"image_id": 10, "category_id": 5, "bbox": [0.0, 0.0, 20.0, 15.0], "score": 0.9},
                   {"image_id": 10, "category_id": 9, "bbox": [1.0, 2.0, 39.0, 28.0], "score": 0.3}]
    assert [r["category_id"] for r in to_coco_results(dets[:1])] == [1, 2]
    top = top1_boxes(dets + [{"image_id": 99, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": []}])
    np.testing.assert_allclose(top[11], [0, 0, 10, 5])
    assert top[99] is None


def test_coco_image_dicts_and_missing_files(tmp_path):
    _images(tmp_path)
    items = image_list([{"id": 3, "file_name": "1.png"}], tmp_path)
    assert items == [(3, str(tmp_path / "1.png"))]
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*missing.*gone\.png"):
        predict(_FixedDetector(), [{"id": 1, "file_name": "gone.png"}, {"id": 2, "file_name": "0.png"}],
                image_root=tmp_path)


def test_real_detector_returns_boxes_in_original_pixels(tmp_path):
    from pipeline.detection.builders import build_detector

    recs = _images(tmp_path, sizes=((120, 90),))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = build_detector("mobilenet_fpn", 1, min_size=64, max_size=96, rpn_topk=(60, 20, 60, 20),
                           score_thresh=0.0, detections_per_img=20)
        (d,) = predict(m, recs)
    finally:
        torch.set_num_threads(n)
    assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"]) > 0
    assert (d["boxes"][:, 2] <= 120 + 1e-3).all() and (d["boxes"][:, 3] <= 90 + 1e-3).all()
    assert d["boxes"][:, 2].max() > 96  # rescaled from the 64 x 85 network input to the 120 x 90 image
    assert (np.diff(d["scores"]) <= 0).all()


def test_detection_pictures_mark_the_top_box(tmp_path):
    from pipeline.viz.detections import write_detection_pictures

    recs = _images(tmp_path, sizes=((40, 30), (20, 10)))
    dets = [{"image_id": 10, "boxes": np.array([[2.0, 16, 12, 26], [20, 10, 40, 30]]), "scores": np.array([0.2, 0.9]),
             "labels": np.array([1, 1])}]
    paths = write_detection_pictures(dets, recs, tmp_path / "pics", num_images=5)
    assert [p.name for p in paths] == ["im0.png"]  # im1 has no detections entry
    from pipeline.viz import style

    a = np.asarray(Image.open(paths[0]))
    top = style.TITLE_BAND  # a picture this small gets its title above it and a legend line below
    assert a.shape[0] == top + 30 + style.LEGEND_BAND and a.shape[1] >= 40
    assert tuple(a[top + 20, 20]) == (255, 40, 40)  # the top box (0.9) is drawn, in red
    assert tuple(a[top + 20, 2]) == (0, 0, 0)  # the 0.2 box is below min_score: not drawn


def test_detections_json_keeps_full_score_precision():
    """Scores are not rounded: 1e-8 apart stays 1e-8 apart (and in order)."""
    det = {"image_id": 1, "boxes": np.array([[0, 0, 10, 10], [1, 1, 9, 9]], float),
           "scores": np.array([0.50000002, 0.50000001]), "labels": np.array([1, 1])}
    res = to_coco_results([det])
    assert [r["score"] for r in res] == [0.50000002, 0.50000001] and res[0]["score"] != res[1]["score"]
    # a float32 detector score is written as the decimal it stands for (0.9, not 0.8999999761581421)
    from pipeline.detection.inference import exact_scores

    s = exact_scores(torch.tensor([0.9, 0.123456789, 1e-8]))
    assert s.tolist() == [0.9, 0.12345679, 1e-08]
    assert np.array_equal(s.astype(np.float32), np.array([0.9, 0.123456789, 1e-8], np.float32))
