"""pipeline.detection.data: COCO json -> validated training samples; the seeded endless sampler."""
from __future__ import annotations

import itertools
import re
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.artifacts import ArtifactError
from pipeline.detection.data import DetectionDataset, InfiniteSampler, epoch_order


def _image(path, w=40, h=30, box=None):
    a = np.zeros((h, w, 3), np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        a[y1:y2, x1:x2] = 255
    Image.fromarray(a).save(path)


def _coco(images, anns, cats=None):
    return {"images": images, "annotations": [dict(a, id=i + 1) for i, a in enumerate(anns)],
            "categories": cats or [{"id": 1, "name": "object"}]}


def test_degenerate_boxes_dropped_counted_and_clipped(tmp_path):
    _image(tmp_path / "a.png")
    boxes = [
        [5, 5, 10, 10],             # kept as is
        [5, 5, 0, 10],              # zero width
        [5, 5, 10, -3],             # negative height
        [float("nan"), 5, 10, 10],  # not finite
        [50, 5, 10, 10],            # fully right of the 40-px-wide image
        [35, 20, 10, 20],           # partly outside: clipped to [35, 20, 40, 30]
        [39.5, 5, 10, 10],          # clipped to a 0.5-px sliver: dropped
    ]
    data = _coco([{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
                 [{"image_id": 7, "bbox": b, "category_id": 1} for b in boxes])
    ds = DetectionDataset(data, tmp_path)
    assert ds.stats["boxes_degenerate"] == 5
    assert ds.stats["boxes_clipped"] == 1
    assert ds.stats["boxes_used"] == 2 and ds.stats["images_used"] == 1
    img, target = ds[0]
    assert img.shape == (3, 30, 40) and img.dtype == torch.float32 and float(img.max()) <= 1.0
    np.testing.assert_allclose(target["boxes"].numpy(), [[5, 5, 15, 15], [35, 20, 40, 30]])
    assert target["labels"].tolist() == [1, 1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 7


def test_missing_images_skipped_with_warning_and_all_missing_is_an_error(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "big.png", 50, 30)
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "gone.png", "width": 40, "height": 30},
              {"id": 3, "file_name": "big.png", "width": 40, "height": 30},  # size differs from the json
              {"id": 4, "file_name": "a.png", "width": 40, "height": 30}]  # no box: skipped
    anns = [{"image_id": i, "bbox": [1, 1, 10, 10], "category_id": 1} for i in (1, 2, 3)]
    with pytest.warns(UserWarning, match=r"2 image\(s\) missing or unreadable.*gone\.png"):
        ds = DetectionDataset(_coco(images, anns), tmp_path)
    assert [e["image_id"] for e in ds.entries] == [1]
    assert (ds.stats["images_missing"], ds.stats["images_size_mismatch"], ds.stats["images_without_boxes"]) == (1, 1, 1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no trainable image left"):
        DetectionDataset(_coco(images[1:2], anns[1:2]), tmp_path)


def test_empty_or_absent_file_names_the_file_and_the_stage(tmp_path):
    p = tmp_path / "pseudo_boxes.json"
    p.write_text(json.dumps(_coco([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], [])))
    with pytest.raises(ValueError, match=r"pseudo_boxes\.json is empty.*written by the mine stage"):
        DetectionDataset(p, tmp_path)
    with pytest.raises(ArtifactError, match=r"not found.*nope\.json.*mine"):
        DetectionDataset(tmp_path / "nope.json", tmp_path)


def test_category_ids_become_contiguous_labels(tmp_path):
    _image(tmp_path / "a.png")
    cats = [{"id": 7, "name": "c7"}, {"id": 3, "name": "c3"}]
    anns = [{"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": c} for c in (7, 3, 9)]
    data = _coco([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], anns, cats)
    ds = DetectionDataset(data, tmp_path)
    assert ds.category_ids == [3, 7] and ds.category_names == ["c3", "c7"] and ds.num_classes == 2
    assert ds[0][1]["labels"].tolist() == [2, 1]
    assert ds.stats["boxes_unknown_category"] == 1
    agnostic = DetectionDataset(data, tmp_path, class_agnostic=True)
    assert agnostic.num_classes == 1 and agnostic[0][1]["labels"].tolist() == [1, 1]


def test_horizontal_flip_moves_pixels_and_boxes_together(tmp_path):
    _image(tmp_path / "a.png", 40, 30, box=(5, 4, 15, 12))
    data = _coco([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                 [{"image_id": 1, "bbox": [5, 4, 10, 8], "category_id": 1}])
    ds = DetectionDataset(data, tmp_path)
    img, t = ds[(0, True)]
    np.testing.assert_allclose(t["boxes"].numpy(), [[25, 4, 35, 12]])
    ys, xs = np.nonzero(img[0].numpy() > 0.5)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (25, 35, 4, 12)
    img0, t0 = ds[(0, False)]
    np.testing.assert_allclose(t0["boxes"].numpy(), [[5, 4, 15, 12]])


def test_infinite_sampler_is_seeded_resumable_and_sharded():
    n = 5
    stream = list(itertools.islice(iter(InfiniteSampler(n, seed=3)), 25))
    for e in range(5):  # each epoch visits every image once, in a new order
        assert sorted(i for i, _, _ in stream[e * n:(e + 1) * n]) == list(range(n))
        assert stream[e * n:(e + 1) * n] == epoch_order(n, 3, e, True)
        assert {ep for _, _, ep in stream[e * n:(e + 1) * n]} == {e}   # the epoch rides along (copy-paste)
    assert len({tuple(stream[e * n:(e + 1) * n]) for e in range(5)}) > 1
    assert stream != list(itertools.islice(iter(InfiniteSampler(n, seed=4)), 25))
    assert any(f for _, f, _ in stream) and not all(f for _, f, _ in stream)
    assert not any(f for _, f, _ in itertools.islice(iter(InfiniteSampler(n, 3, flip=False)), 25))
    # resuming at global position 12 continues the same stream
    assert list(itertools.islice(iter(InfiniteSampler(n, seed=3, start=12)), 13)) == stream[12:]
    # two ranks interleave the global stream
    r0 = list(itertools.islice(iter(InfiniteSampler(n, seed=3, start=2, rank=0, world_size=2)), 5))
    r1 = list(itertools.islice(iter(InfiniteSampler(n, seed=3, start=2, rank=1, world_size=2)), 5))
    assert r0 == stream[2:12:2] and r1 == stream[3:13:2]


# ------------------------------------------------------------------------------------------------ masks
def _masked(tmp_path):
    """One 40 x 30 image, two objects with masks (RLE and polygon) and a degenerate box (dropped with its mask)."""
    from pipeline.masks import encode_rle

    _image(tmp_path / "a.png")
    m1 = np.zeros((30, 40), bool)
    m1[2:8, 3:10] = True
    anns = [{"image_id": 1, "bbox": [3, 2, 7, 6], "category_id": 1, "segmentation": encode_rle(m1)},
            {"image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1, "segmentation": encode_rle(m1)},  # zero width
            {"image_id": 1, "bbox": [20, 10, 10, 10], "category_id": 1,
             "segmentation": [[20, 10, 30, 10, 30, 20, 20, 20]]}]
    return _coco([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], anns), m1


def test_masks_follow_their_kept_boxes_and_the_flip(tmp_path):
    data, m1 = _masked(tmp_path)
    ds = DetectionDataset(data, tmp_path, masks=True)
    image, t = ds[0]
    assert t["masks"].shape == (2, 30, 40) and t["masks"].dtype == torch.uint8
    assert torch.equal(t["masks"][0].bool(), torch.from_numpy(m1))
    square = t["masks"][1].bool()
    assert square[12:19, 22:29].all() and not square[:, :19].any()  # the polygon, rasterised
    _, flipped = ds[(0, True)]
    assert torch.equal(flipped["masks"], t["masks"].flip(-1))
    assert "masks" not in DetectionDataset(data, tmp_path)[0][1]  # a box detector: boxes only, masks kept in the file


@pytest.mark.parametrize("change, message", [
    (lambda a: a[0].update(segmentation={"size": [31, 40], "counts": a[0]["segmentation"]["counts"]}),
     "annotation 1 (image 1): its segmentation is RLE of size [31, 40]"),
    (lambda a: a[0].update(segmentation={"size": [30, 40], "counts": "0zzz"}), "annotation 1 (image 1): its "
     "segmentation is broken RLE counts"),
    (lambda a: a[2].update(segmentation=[[20, 10, 30, 10]]), "annotation 3 (image 1): its segmentation is a polygon "
     "with fewer than three points"),
    (lambda a: a[2].update(image_id=99), "annotation 3 has a mask of image 99, which is not in the file's images"),
])
def test_bad_masks_name_the_annotation_and_train_nothing(tmp_path, change, message):
    data, _ = _masked(tmp_path)
    change(data["annotations"])
    for masks in (True, False):  # a box detector refuses a broken mask file too
        with pytest.raises(ValueError, match=re.escape(message)):
            DetectionDataset(data, tmp_path, masks=masks)


def test_a_mask_detector_on_a_box_file_says_what_gives_masks(tmp_path):
    from pipeline.detection.data import MasksMissing

    data, _ = _masked(tmp_path)
    for a in data["annotations"]:
        a.pop("segmentation")
    with pytest.raises(MasksMissing, match="has no masks .* every miner writes"):
        DetectionDataset(data, tmp_path, masks=True)
    data, _ = _masked(tmp_path)
    data["annotations"][2].pop("segmentation")
    with pytest.raises(ValueError, match="annotation 3 has no mask"):
        DetectionDataset(data, tmp_path, masks=True)
