"""pipeline.detection.copy_paste: one paste by hand-computed cases; the seeded wrapper."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.detection.copy_paste import (CopyPasteDataset, copy_paste, draw_paste, mask_boxes, scaled_size)
from pipeline.detection.data import DetectionDataset
from pipeline.masks import encode_rle, resize_mask


def _sample(h, w, rects, labels=None, seed=0, image_id=1):
    """An (h, w) random image with one rectangular mask per (y0, y1, x0, x1) of ``rects``."""
    image = torch.from_numpy(np.random.default_rng(seed).random((3, h, w), dtype=np.float32))
    masks = torch.zeros((len(rects), h, w), dtype=torch.uint8)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = 1
    labels = torch.tensor(labels if labels is not None else [1] * len(rects), dtype=torch.int64)
    return image, {"boxes": mask_boxes(masks), "labels": labels, "image_id": image_id, "masks": masks}


def _box(t, k):
    return t["boxes"][k].tolist()


def test_mask_boxes_are_exclusive_extents_and_empty_is_zero():
    m = torch.zeros((2, 5, 6), dtype=torch.uint8)
    m[0, 1, 2] = 1
    m[0, 3, 4] = 1
    assert mask_boxes(m).tolist() == [[2, 1, 5, 4], [0, 0, 0, 0]]


def test_known_occlusion_gives_hand_computed_boxes_and_masks():
    image, target = _sample(10, 10, [(2, 7, 2, 7)], labels=[1])          # rows/cols 2..6
    src, src_t = _sample(6, 6, [(1, 4, 2, 5)], labels=[5], seed=1)        # a 3x3 object
    out, t = copy_paste(image, target, src, src_t, scale=1.0, offset=(4, 4))
    assert t["labels"].tolist() == [1, 5] and t["image_id"] == 1
    expected = torch.zeros((10, 10), dtype=torch.uint8)
    expected[2:7, 2:7] = 1
    expected[4:7, 4:7] = 0                                                # the bottom-right corner is covered
    assert torch.equal(t["masks"][0], expected)
    assert _box(t, 0) == [2, 2, 7, 7]                                     # the extent stays
    assert _box(t, 1) == [4, 4, 7, 7] and int(t["masks"][1].sum()) == 9
    assert t["boxes"].dtype == torch.float32 and t["masks"].dtype == torch.uint8
    # covering its two right columns from top to bottom shrinks the box
    src2, src2_t = _sample(8, 8, [(0, 6, 0, 3)], labels=[5], seed=2)
    _, t2 = copy_paste(image, target, src2, src2_t, scale=1.0, offset=(5, 1))
    assert _box(t2, 0) == [2, 2, 5, 7] and _box(t2, 1) == [5, 1, 8, 7]
    assert int(t2["masks"][0].sum()) == 15


def test_an_object_covered_entirely_disappears_with_its_label():
    image, target = _sample(10, 10, [(3, 5, 3, 5), (7, 9, 0, 2)], labels=[1, 2])
    src, src_t = _sample(6, 6, [(0, 4, 0, 4)], labels=[7], seed=1)
    _, t = copy_paste(image, target, src, src_t, scale=1.0, offset=(2, 2))
    assert t["labels"].tolist() == [2, 7]
    assert t["boxes"].tolist() == [[0, 7, 2, 9], [2, 2, 6, 6]]
    assert t["masks"].shape == (2, 10, 10)
    assert torch.equal(t["masks"][0], target["masks"][1])


def test_pasted_pixels_are_the_sources_under_the_mask_and_the_rest_is_unchanged():
    image, target = _sample(12, 12, [(1, 6, 1, 6)])
    src, src_t = _sample(9, 9, [(2, 7, 3, 8), (0, 2, 0, 2)], labels=[3, 4], seed=3)
    src_t["masks"][0, 2, 3] = 0                                           # not a rectangle
    src_t["masks"][0, 6, 7] = 0
    before = image.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}
    out, t = copy_paste(image, target, src, src_t, scale=1.0, offset=(5, 4), select=[0])
    assert torch.equal(image, before[0]) and torch.equal(target["masks"], before[1]["masks"])  # inputs kept
    alpha = torch.zeros((12, 12), dtype=torch.bool)
    alpha[4:9, 5:10] = src_t["masks"][0, 2:7, 3:8].bool()
    expected = image.clone()
    expected[:, 4:9, 5:10] = src[:, 2:7, 3:8]
    assert torch.equal(out[:, alpha], expected[:, alpha])
    assert torch.equal(out[:, ~alpha], image[:, ~alpha])
    assert t["labels"].tolist() == [1, 3] and torch.equal(t["masks"][1].bool(), alpha)
    # scaled: the pixels are the bilinear resize of the block, under the nearest-neighbour mask
    out2, t2 = copy_paste(image, target, src, src_t, scale=2.0, offset=(0, 0), select=[0])
    block = F.interpolate(src[None, :, 2:7, 3:8], size=(10, 10), mode="bilinear", align_corners=False)[0]
    m = torch.from_numpy(resize_mask(src_t["masks"][0, 2:7, 3:8].bool().numpy(), (10, 10)))
    assert torch.equal(t2["masks"][1, :10, :10].bool(), m) and not t2["masks"][1, 10:].any()
    assert torch.allclose(out2[:, :10, :10][:, m], block[:, m])
    full = torch.zeros((12, 12), dtype=torch.bool)
    full[:10, :10] = m
    assert torch.equal(out2[:, ~full], image[:, ~full])


@pytest.mark.parametrize("scale, offset, box", [
    (0.5, (1, 1), [1, 1, 3, 3]),
    (2.0, (0, 0), [0, 0, 8, 8]),
    (2.0, (6, 7), [6, 7, 10, 10]),        # clipped at the bottom-right border
    (2.0, (-2, -3), [0, 0, 6, 5]),        # clipped at the top-left border
    (0.5, None, [1, 1, 3, 3]),            # where the source scaled by 0.5 puts it: (2, 2) * 0.5
    (0.75, (0, 0), [0, 0, 3, 3]),         # 4 * 0.75 = 3
])
def test_scale_gives_the_hand_computed_box_and_the_border_clips(scale, offset, box):
    image, target = _sample(10, 10, [(0, 1, 9, 10)])
    src, src_t = _sample(8, 8, [(2, 6, 2, 6)], labels=[2], seed=1)       # a 4x4 object at (2, 2)
    _, t = copy_paste(image, target, src, src_t, scale=scale, offset=offset)
    assert _box(t, 1) == box
    x0, y0, x1, y1 = box
    assert int(t["masks"][1].sum()) == (x1 - x0) * (y1 - y0)
    assert scaled_size(3, 5, 0.5) == (2, 3) and scaled_size(1, 1, 0.1) == (1, 1)


def test_sizes_differ_and_a_block_outside_pastes_nothing():
    image, target = _sample(8, 8, [(2, 5, 2, 5)])
    src, src_t = _sample(20, 24, [(0, 20, 0, 24)], labels=[2], seed=1)   # larger than the destination
    out, t = copy_paste(image, target, src, src_t, scale=1.0, offset=(-3, -5))
    assert t["labels"].tolist() == [2] and _box(t, 0) == [0, 0, 8, 8]
    assert torch.equal(out, src[:, 5:13, 3:11])
    out, t = copy_paste(image, target, src, src_t, scale=0.5, offset=(8, 0))   # wholly right of the image
    assert torch.equal(out, image) and t["labels"].tolist() == [1] and torch.equal(t["masks"], target["masks"])


def test_bad_inputs_are_refused():
    image, target = _sample(8, 8, [(2, 5, 2, 5)])
    src, src_t = _sample(8, 8, [(2, 5, 2, 5)], seed=1)
    with pytest.raises(ValueError, match="no 'masks'"):
        copy_paste(image, target, src, {k: v for k, v in src_t.items() if k != "masks"})
    with pytest.raises(ValueError, match="out of the source's 1 objects"):
        copy_paste(image, target, src, src_t, select=[1])
    with pytest.raises(ValueError, match="positive"):
        copy_paste(image, target, src, src_t, scale=0.0)


def test_draw_paste_stays_in_range_and_fits_the_block():
    _, src_t = _sample(16, 16, [(0, 8, 0, 8), (10, 16, 10, 16), (4, 6, 12, 14)])
    src_t["masks"][2] = 0                                                 # an empty mask is never chosen
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = draw_paste(rng, src_t["masks"], (12, 20), (0.3, 1.0))
        assert 0.3 <= p.scale <= 1.0 and p.select and set(p.select) <= {0, 1}
        x0, y0, x1, y1 = mask_boxes(src_t["masks"][list(p.select)].amax(0, keepdim=True))[0].int().tolist()
        h, w = scaled_size(y1 - y0, x1 - x0, p.scale)
        for o, room in zip(p.offset, (20 - w, 12 - h)):   # wholly inside when it fits, else covering the axis
            assert (0 <= o <= room) if room >= 0 else (room <= o <= 0)
    assert draw_paste(rng, torch.zeros((2, 4, 4)), (4, 4)) is None
    with pytest.raises(ValueError, match="0 < low <= high"):
        draw_paste(rng, src_t["masks"], (4, 4), (1.0, 0.5))


class _Tiny:
    """A DetectionDataset-like set: (i, flip) keys, random images, two rectangular objects each."""

    masks = True
    num_classes = 3

    def __init__(self, n=5):
        self.samples = [_sample(12 + i, 14, [(1, 5, 1 + i, 6 + i), (6, 11, 2, 9)], labels=[1, 2], seed=i,
                                image_id=i) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        i, flip = key
        image, t = self.samples[i]
        t = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()}
        if flip:
            w = image.shape[-1]
            image, t["masks"] = image.flip(-1), t["masks"].flip(-1)
            b = t["boxes"]
            t["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        return image.clone(), t


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) if torch.is_tensor(a[1][k]) else a[1][k] == b[1][k] for k in a[1])


def test_wrapper_is_a_pure_function_of_seed_and_key():
    ds = _Tiny()
    a, b = CopyPasteDataset(ds, 1.0, seed=3), CopyPasteDataset(ds, 1.0, seed=3)
    keys = [(i, f) for i in range(5) for f in (False, True)]
    assert all(_same(a[k], b[k]) for k in keys)
    assert all(not _same(a[k], ds[k]) for k in keys)                       # probability 1: always pasted
    draws = [a[(0, False, e)] for e in range(6)]                           # an extra key element reseeds
    assert any(not _same(draws[0], d) for d in draws[1:])
    other = CopyPasteDataset(ds, 1.0, seed=4)
    assert any(not _same(a[k], other[k]) for k in keys)
    for k in keys:
        image, t = a[k]
        assert image.shape == ds[k][0].shape and t["image_id"] == k[0]
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1
        assert torch.equal(t["boxes"], mask_boxes(t["masks"]))
    assert len(a) == 5 and a.num_classes == 3


def test_wrapper_with_probability_zero_returns_the_sample_unchanged():
    ds = _Tiny()
    w = CopyPasteDataset(ds, 0.0, scale_range=(0.1, 2.0), seed=1)
    assert all(_same(w[(i, f)], ds[(i, f)]) for i in range(5) for f in (False, True))
    half = CopyPasteDataset(ds, 0.5, seed=1)
    changed = sum(not _same(half[(i, False, e)], ds[(i, False)]) for i in range(5) for e in range(8))
    assert 5 <= changed <= 35
    with pytest.raises(ValueError, match="probability"):
        CopyPasteDataset(ds, 1.5)
    no_masks = _Tiny()
    no_masks.masks = False
    with pytest.raises(ValueError, match="needs masks"):
        CopyPasteDataset(no_masks, 0.5)


def test_wrapper_on_a_detection_dataset(tmp_path):
    images, anns = [], []
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 24, "height": 20})
        m = np.zeros((20, 24), bool)
        m[3 + i:12, 4:15 + i] = True
        anns.append({"id": i + 1, "image_id": i + 1, "bbox": [4, 3 + i, 11 + i, 9 - i], "category_id": 1,
                     "segmentation": encode_rle(m)})
    ds = DetectionDataset({"images": images, "annotations": anns, "categories": [{"id": 1}]}, tmp_path, masks=True)
    w = CopyPasteDataset(ds, 1.0, seed=0)
    for key in [(0, False), (1, True), (2, False)]:
        image, t = w[key]
        assert image.shape == (3, 20, 24) and t["masks"].shape[1:] == (20, 24)
        assert torch.equal(t["boxes"], mask_boxes(t["masks"])) and len(t["labels"]) == len(t["masks"])
        assert _same(w[key], (image, t))
