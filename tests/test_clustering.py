"""Box crops (geometry), cached box features, whitening, pseudo-labels and galleries."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.artifacts import coco_boxes_dataset
from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD
from pipeline.clustering.crops import (
    batches_by_shape, box_pixel_bounds, crop_box, resize_shorter, resized_shape, trim_to_patch,
)
from pipeline.clustering.features import (
    extract_box_features, l2_normalize, load_box_crops, prepare_features, whiten,
)
from pipeline.clustering.kmeans import KMeansResult
from pipeline.clustering.labels import make_pseudo_labels
from pipeline.viz.gallery import cluster_gallery, write_cluster_galleries


def coord_image(h=60, w=80):
    """Pixel (y, x) holds (y, x, 7): a crop's first pixel tells where it starts."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=2).astype(np.uint8)


# --------------------------------------------------------------------------- crop geometry
def test_crop_rounds_half_to_even_and_keeps_exclusive_ends():
    img = coord_image()
    crop = crop_box(img, [10.4, 5.5, 30.6, 20.5])
    # x1 = round(10.4) = 10, y1 = round(5.5) = 6 (half to even), x2 = round(30.6) = 31, y2 = round(20.5) = 20
    assert crop.shape == (14, 21, 3)
    assert tuple(crop[0, 0]) == (6, 10, 7)
    assert tuple(crop[-1, -1]) == (19, 30, 7)
    assert box_pixel_bounds([2.5, 3.5, 4.5, 5.5], 80, 60) == (2, 4, 4, 6)


def test_crop_clips_to_image_and_keeps_one_pixel():
    img = coord_image()
    assert crop_box(img, [-5, -3, 1000, 999]).shape == (60, 80, 3)
    tiny = crop_box(img, [10.0, 12.0, 10.2, 12.3])
    assert tiny.shape == (1, 1, 3) and tuple(tiny[0, 0]) == (12, 10, 7)
    outside = crop_box(img, [85, 70, 90, 75])
    assert outside.shape == (1, 1, 3) and tuple(outside[0, 0]) == (59, 79, 7)
    with pytest.raises(ValueError, match="4 finite numbers"):
        crop_box(img, [0, 0, np.nan, 3])


def test_resize_shorter_side_and_truncated_long_side():
    assert resized_shape(14, 21) == (256, 384)
    assert resized_shape(100, 37) == (691, 256)          # 256 * 100 / 37 = 691.9 -> 691
    assert resized_shape(50, 50) == (256, 256)
    assert resized_shape(10, 1000, max_size=1000) == (10, 1000)   # long side capped, short side scaled
    # the default cap: a 400x17 box (W x H) is 1024 x 43 px, not 6023 x 256 (a minute to embed on a CPU)
    from stages.config import ClusterConf
    from stage_utils import compose_cfg

    assert ClusterConf().max_size == compose_cfg("cluster", []).cluster.max_size == 1024
    assert resized_shape(17, 400, 256, 1024) == (43, 1024) and resized_shape(17, 400, 256) == (256, 6023)
    assert resized_shape(100, 400, 256, 1024) == (256, 1024)  # 4:1 and squarer boxes are not affected
    crop = coord_image(14, 21)
    out = resize_shorter(crop, 256)
    expected = np.asarray(Image.fromarray(crop).resize((384, 256), Image.BICUBIC))
    assert out.shape == (256, 384, 3) and np.array_equal(out, expected)
    assert trim_to_patch(np.zeros((691, 256, 3)), 16).shape == (688, 256, 3)
    assert trim_to_patch(np.zeros((691, 256, 3)), 8).shape == (688, 256, 3)


def test_batches_group_identical_shapes_only():
    shapes = [(2, 3), (2, 4), (2, 3), (2, 3), (2, 4), (5, 5)]
    items = [(i, np.zeros(s)) for i, s in enumerate(shapes)]
    batches = list(batches_by_shape(items, batch_size=2))
    seen = sorted(k for keys, _ in batches for k in keys)
    assert seen == list(range(6))
    for keys, arrays in batches:
        assert len({a.shape for a in arrays}) == 1 and len(keys) <= 2
    assert [0, 2] in [keys for keys, _ in batches]  # first full bucket, in input order
    # memory bound: with max_pending=1 nothing waits for a full bucket
    assert all(len(k) == 1 for k, _ in batches_by_shape(items[:2], batch_size=4, max_pending=1))


# --------------------------------------------------------------------------- features
class FakeBackbone:
    """Embedding = per-channel mean of the normalised input + its H and W; records every batch."""

    patch_size = 16
    device = "cpu"

    def __init__(self, tag="fake"):
        self.tag = tag
        self.batches = []

    def describe(self):
        return {"arch": self.tag}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3
        self.batches.append(tuple(x.shape))
        b, _, h, w = x.shape
        hw = torch.tensor([h, w], dtype=torch.float32).expand(b, 2)
        return torch.cat([x.mean(dim=(2, 3)), hw], dim=1)


def _norm(rgb):
    return (np.asarray(rgb) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


@pytest.fixture
def two_colour_images(tmp_path):
    """a.png: left half red, right half blue (100 x 200); b.png: all green (64 x 64)."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:] = (0, 0, 255)
    b = np.zeros((64, 64, 3), np.uint8)
    b[:] = (0, 255, 0)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    images = [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
              {"id": 2, "file_name": "b.png", "width": 64, "height": 64}]
    anns = [{"image_id": 1, "bbox_xyxy": [10, 10, 60, 90]},      # red, 50 x 80 -> 256 x 409 -> 400
            {"image_id": 1, "bbox_xyxy": [120, 20, 180, 50]},    # blue, 60 x 30 -> 512 x 256
            {"image_id": 2, "bbox_xyxy": [0, 0, 32, 32]},        # green, square -> 256 x 256
            {"image_id": 1, "bbox_xyxy": [130, 10, 170, 30]}]    # blue, 40 x 20 -> 512 x 256
    return tmp_path, coco_boxes_dataset(images, anns)


def test_features_follow_crop_spec_and_batch_by_shape(two_colour_images):
    root, coco = two_colour_images
    bb = FakeBackbone()
    res = extract_box_features(coco, root, bb, batch_size=8)
    assert not res.from_cache and res.skipped == []
    assert res.index == [(1, 1), (2, 1), (3, 2), (4, 1)]
    f = res.features
    assert f.dtype == np.float32 and f.shape == (4, 5)
    np.testing.assert_allclose(f[0, :3], _norm((255, 0, 0)), atol=1e-5)
    np.testing.assert_allclose(f[1, :3], _norm((0, 0, 255)), atol=1e-5)
    np.testing.assert_allclose(f[2, :3], _norm((0, 255, 0)), atol=1e-5)
    # (H, W) fed to the network: shorter side 256, longer side truncated then trimmed to 16
    assert f[0, 3:].tolist() == [400, 256]   # 80/50*256 = 409.6 -> 409 -> 400
    assert f[1, 3:].tolist() == [256, 512]
    assert f[2, 3:].tolist() == [256, 256]
    # the two 2:1 blue crops share one batch; three batches in all
    assert sorted(bb.batches) == sorted([(1, 3, 400, 256), (2, 3, 256, 512), (1, 3, 256, 256)])


def test_features_are_cached_and_reused(two_colour_images, tmp_path):
    root, coco = two_colour_images
    cache = tmp_path / "cache"
    first = extract_box_features(coco, root, FakeBackbone(), cache_dir=cache)
    assert (cache / "features.npy").is_file() and (cache / "features_index.json").is_file()
    bb = FakeBackbone()
    second = extract_box_features(coco, root, bb, cache_dir=cache)
    assert second.from_cache and bb.batches == []          # nothing recomputed
    assert np.array_equal(first.features, second.features) and first.index == second.index
    # another backbone or other boxes -> another key -> recompute
    other = FakeBackbone(tag="other")
    assert not extract_box_features(coco, root, other, cache_dir=cache).from_cache and other.batches
    coco2 = json.loads(json.dumps(coco))
    coco2["annotations"][0]["bbox"][0] += 3
    bb3 = FakeBackbone(tag="other")
    assert not extract_box_features(coco2, root, bb3, cache_dir=cache).from_cache and bb3.batches
    # a features file that does not match its index is not trusted
    np.save(cache / "features.npy", np.zeros((4, 5), np.float32))
    bb4 = FakeBackbone(tag="other")
    assert not extract_box_features(coco2, root, bb4, cache_dir=cache).from_cache and bb4.batches


def test_missing_or_corrupt_image_skips_its_boxes(two_colour_images):
    root, coco = two_colour_images
    (root / "b.png").write_bytes(b"not a png")
    coco["images"].append({"id": 3, "file_name": "gone.jpg", "width": 10, "height": 10})
    coco["annotations"].append({"id": 9, "image_id": 3, "bbox": [0, 0, 5, 5], "category_id": 1})
    res = extract_box_features(coco, root, FakeBackbone())
    assert res.index == [(1, 1), (2, 1), (4, 1)]
    assert {(s["annotation_id"], s["image_id"]) for s in res.skipped} == {(3, 2), (9, 3)}
    assert any("gone.jpg" in s["reason"] for s in res.skipped)


def test_a_sliver_thinner_than_a_patch_after_max_size_is_skipped(two_colour_images):
    """A 190 x 4 px box: shorter side 256 would make it 12,160 px long, max_size=64 caps that and leaves it 1 px
    thick, below one 16 px patch: skipped with its reason (max_size), the others embedded."""
    root, coco = two_colour_images
    coco["annotations"].append({"id": 7, "image_id": 1, "bbox": [5, 50, 190, 4], "category_id": 1})
    res = extract_box_features(coco, root, FakeBackbone(), short_side=32, max_size=64)
    assert res.index == [(1, 1), (2, 1), (3, 2), (4, 1)]
    assert [(s["annotation_id"], s["image_id"]) for s in res.skipped] == [(7, 1)]
    assert "thinner than one 16 px patch" in res.skipped[0]["reason"] and "max_size" in res.skipped[0]["reason"]


def test_real_vit_batched_equals_one_by_one(two_colour_images):
    from pipeline.backbones import build_backbone

    root, coco = two_colour_images
    coco["annotations"] = coco["annotations"][1:2] + coco["annotations"][3:]  # the two 512 x 256 crops
    bb = build_backbone("dino_vits16", init="random", seed=0)
    batched = extract_box_features(coco, root, bb, batch_size=2, short_side=64).features  # small: fast
    single = extract_box_features(coco, root, bb, batch_size=1, short_side=64).features
    assert batched.shape == (2, 384)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_whiten_and_normalise_match_reference_chain():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32) * np.array([1, 2, 3, 4, 5, 6], np.float32)
    x[:, 5] = 3.0  # a constant dimension is left unscaled
    w = whiten(x)
    np.testing.assert_allclose(w[:, :5].std(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w[:, 5], 3.0)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x), axis=1), 1.0, rtol=1e-6)
    # naive reference chain: l2, divide by population std, l2
    n1 = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = n1.std(axis=0)
    n2 = n1 / s
    ref = n2 / np.linalg.norm(n2, axis=1, keepdims=True)
    np.testing.assert_allclose(prepare_features(x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prepare_features(x, whiten_features=False), n1, rtol=1e-6)
    np.testing.assert_array_equal(prepare_features(x, whiten_features=False, normalize=False), x)


# --------------------------------------------------------------------------- pseudo-labels, galleries
def test_pseudo_labels_use_cluster_plus_one_and_drop_unindexed(two_colour_images):
    _, coco = two_colour_images
    coco["info"] = {"method": "lost"}
    coco["annotations"][0]["score"] = 0.7
    res = KMeansResult(labels=np.array([2, 0, 2]), centroids=np.eye(3, 4, dtype=np.float32), inertia=1.5,
                       sizes=np.array([1, 0, 2]), seed=4)
    out = make_pseudo_labels(coco, [(1, 1), (3, 2), (4, 1)], res)
    assert [c["id"] for c in out["categories"]] == [1, 2, 3]
    assert [c["name"] for c in out["categories"]] == ["cluster_0", "cluster_1", "cluster_2"]
    assert [(a["id"], a["category_id"]) for a in out["annotations"]] == [(1, 3), (3, 1), (4, 3)]
    assert out["annotations"][0]["score"] == 0.7 and out["annotations"][0]["bbox"] == coco["annotations"][0]["bbox"]
    assert out["info"]["method"] == "lost" and out["info"]["sizes"] == [1, 0, 2] and out["info"]["k"] == 3
    assert np.array_equal(np.array(out["info"]["centroids"]), np.eye(3, 4)) and out["info"]["n_dropped"] == 1
    assert coco["annotations"][0]["category_id"] == 1  # input untouched
    with pytest.raises(ValueError, match="stale"):
        make_pseudo_labels(coco, [(1, 1), (3, 2), (77, 1)], res)


def test_gallery_png_grid(two_colour_images, tmp_path):
    root, coco = two_colour_images
    crops = load_box_crops(coco, root, [1, 2, 3])
    assert sorted(crops) == [1, 2, 3] and crops[1].shape == (80, 50, 3) and tuple(crops[3][0, 0]) == (0, 255, 0)
    path = cluster_gallery([crops[1]] * 20, tmp_path / "g.png", "cluster 0", n=16, thumb=32, cols=8)
    img = np.asarray(Image.open(path))
    assert img.shape == (18 + 2 * 34 + 2, 8 * 34 + 2, 3)   # 16 of 20 crops: 2 rows of 8
    # a thumbnail holds the red crop, centred (80 x 50 -> 32 x 20)
    assert tuple(img[18 + 2 + 16, 2 + 16]) == (255, 0, 0)
    paths = write_cluster_galleries({0: [crops[1]], 1: [crops[3], crops[2]]}, tmp_path / "gal", sizes={0: 1, 1: 2})
    assert [p.name for p in paths] == ["cluster_0.png", "cluster_1.png"] and all(p.is_file() for p in paths)


def test_gallery_crops_show_their_masks_and_survive_bad_ones():
    from pipeline.clustering.run import _with_masks
    from pipeline.masks import encode_rle

    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:15] = True                       # the left half of the box [10, 5, 20, 15]
    crop = np.full((10, 10, 3), 100, np.uint8)
    coco = {"images": [{"id": 1, "width": 30, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 5, 10, 10], "segmentation": encode_rle(mask)},
                            {"id": 2, "image_id": 1, "bbox": [10, 5, 10, 10],
                             "segmentation": {"size": [5, 5], "counts": "broken"}}]}
    out = _with_masks(coco, {1: crop, 2: crop})
    assert (out[1][:, :5] != 100).any() and (out[1][:, 5:] == 100).all()   # tinted inside the mask only
    assert out[2] is crop                                                    # a bad mask: the crop as it is
