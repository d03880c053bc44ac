"""Hungarian cluster-to-class evaluation: permuted GT, K > / < classes, a hand-computed partial case."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.records import ImageRecord
from pipeline.evaluation.hungarian import detections_from_coco_results, hungarian_evaluate, to_markdown

CLASSES = ["cat", "dog", "car", "boat", "bird"]


def scene(seed=0, n_images=12):
    """Random images with 1-4 objects of random classes (some difficult)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        n = int(rng.integers(1, 5))
        x1, y1 = rng.uniform(0, 200, n), rng.uniform(0, 200, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(20, 100, n), y1 + rng.uniform(20, 100, n)], 1)
        cls = [CLASSES[c] for c in rng.integers(0, len(CLASSES), n)]
        records.append(ImageRecord(f"im{i}", 100 + i, f"im{i}.jpg", 300, 300, boxes, cls, rng.random(n) < 0.1))
    for j, c in enumerate(CLASSES):  # every class present at least once, not difficult
        records.append(ImageRecord(f"extra{j}", 500 + j, "x.jpg", 300, 300, [[10, 10, 60, 60]], [c], [False]))
    return records


def gt_as_coco_results(records, cluster_of_class, rng):
    return [{"image_id": r.coco_id, "category_id": int(cluster_of_class[c]), "score": float(rng.random()),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for r in records for b, c in zip(r.boxes, r.classes)]


def test_permuted_ground_truth_is_matched_back():
    records = scene()
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(CLASSES))               # class c is labelled cluster perm[c]
    res = hungarian_evaluate(gt_as_coco_results(records, dict(zip(CLASSES, perm)), rng), records, CLASSES)
    assert res["mean"] == {"AP50": pytest.approx(100), "AP75": pytest.approx(100), "AP50:95": pytest.approx(100)}
    assert res["matching"] == {c: int(perm[i]) for i, c in enumerate(CLASSES)}
    inverse = np.argsort(perm)                         # cluster k is class inverse[k]
    assert {k: c for c, k in res["matching"].items()} == {k: CLASSES[inverse[k]] for k in range(len(CLASSES))}
    assert res["unmatched_clusters"] == [] and res["unmatched_classes"] == [] and res["classes_without_gt"] == []
    m = np.array(res["ap50_matrix"])
    assert m.shape == (5, 5) and np.allclose(m[np.arange(5), perm], 100)
    off = m.copy()
    off[np.arange(5), perm] = np.nan
    assert np.nanmax(off) < 100


def test_more_clusters_than_classes_reports_the_extra_clusters():
    records = scene(seed=2)
    rng = np.random.default_rng(3)
    mapping = {c: 10 + 2 * i for i, c in enumerate(CLASSES)}   # clusters 10, 12, ..., 18
    results = gt_as_coco_results(records, mapping, rng)
    for r in records[:6]:                                      # clusters 7 and 9: junk boxes
        results.append({"image_id": r.coco_id, "category_id": 7, "score": 0.99, "bbox": [250, 250, 30, 30]})
        results.append({"image_id": r.coco_id, "category_id": 9, "score": 0.5, "bbox": [0, 280, 20, 20]})
    res = hungarian_evaluate(results, records, CLASSES, cluster_ids=[7, 9, 10, 11, 12, 14, 16, 18])
    assert res["matching"] == mapping
    assert res["unmatched_clusters"] == [7, 9, 11]              # 11 has no detection at all
    assert res["mean"]["AP50"] == pytest.approx(100) and res["unmatched_classes"] == []
    assert np.array(res["ap50_matrix"]).shape == (5, 8)


def test_fewer_clusters_than_classes_leaves_a_class_at_zero():
    records = [ImageRecord(f"i{j}", j, "x.jpg", 100, 100, [[0, 0, 50, 50]], [c], [False])
               for j, c in enumerate(["a", "a", "b", "b", "c", "c"])]
    det = {r.image_id: {"boxes": r.boxes, "labels": np.array([0 if r.classes[0] in "ab" else 1]),
                        "scores": np.array([0.9 if r.classes[0] != "b" else 0.4])} for r in records}
    res = hungarian_evaluate(det, records, ["a", "b", "c"])
    # cluster 0 holds a (high scores) and b (low): AP(a) = 100, AP(b) = 0.5*0.5 + 0.5*0.5 = 50
    assert np.array(res["ap50_matrix"]).round(6).tolist() == [[100, 0], [50, 0], [0, 100]]
    assert res["matching"] == {"a": 0, "c": 1}
    assert res["unmatched_classes"] == ["b"] and res["unmatched_clusters"] == []
    assert res["per_class"]["b"] == {"cluster": None, "AP50": 0.0, "AP75": 0.0, "AP50:95": 0.0}
    assert res["mean"]["AP50"] == pytest.approx(200 / 3)
    md = to_markdown(res)
    assert "| b | - | 0.00 |" in md and "Unmatched classes (AP 0): b" in md and "**66.67**" in md


def test_partial_overlaps_hand_computed():
    records = [
        ImageRecord("1", 1, "1.jpg", 500, 500, [[0, 0, 100, 100], [200, 200, 300, 300]], ["cat", "cat"]),
        ImageRecord("2", 2, "2.jpg", 500, 500, [[0, 0, 50, 50]], ["dog"]),
        ImageRecord("3", 3, "3.jpg", 500, 500, [[0, 0, 10, 10]], ["zebra"], [True]),   # only difficult
    ]
    det = {"1": {"boxes": np.array([[0, 0, 100, 82], [200, 200, 300, 262], [400, 400, 410, 410]]),
                 "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 1, 1])},
           "2": {"boxes": np.array([[0, 0, 50, 50]]), "scores": np.array([0.5]), "labels": np.array([2])}}
    res = hungarian_evaluate(det, records, ["cat", "dog", "zebra"])
    # cat / cluster 1: IoUs 0.82 and 0.62 and a miss.
    #   t in .50 .55 .60: TP TP FP -> AP 1;  t in .65 .. .80: TP FP FP -> 0.5;  t >= .85: 0
    cat = res["per_class"]["cat"]
    assert cat["cluster"] == 1 and cat["AP50"] == pytest.approx(100) and cat["AP75"] == pytest.approx(50)
    assert cat["AP50:95"] == pytest.approx((3 * 100 + 4 * 50) / 10)
    assert res["per_class"]["dog"] == {"cluster": 2, "AP50": 100.0, "AP75": 100.0, "AP50:95": 100.0}
    assert res["classes_without_gt"] == ["zebra"] and "zebra" not in res["per_class"]
    assert res["mean"] == pytest.approx({"AP50": 100, "AP75": 75, "AP50:95": 75})
    assert res["ap50_matrix"] == [[100, 0], [0, 100], [None, None]]


def test_bad_detections_have_clear_errors():
    records = scene(n_images=2)
    with pytest.raises(ValueError, match="not in the ground-truth dataset"):
        hungarian_evaluate([{"image_id": 99999, "category_id": 1, "score": 1, "bbox": [0, 0, 1, 1]}], records)
    with pytest.raises(ValueError, match="lacks"):
        detections_from_coco_results([{"image_id": 100, "bbox": [0, 0, 1, 1]}], records)
    with pytest.raises(ValueError, match="nothing to match"):
        hungarian_evaluate([], records, CLASSES)


# ----------------------------------------------------------------------------- cluster numbering
def _zero_based(results):
    return [dict(d, category_id=d["category_id"] - 1) for d in results]


def test_zero_and_one_based_cluster_files_score_the_same():
    """LOST / detectron2 write clusters 0..K-1; the cluster stage writes category ids 1..K."""
    records = scene(seed=4)
    rng = np.random.default_rng(5)
    k = 7                                                   # 5 classes, 7 clusters
    one = gt_as_coco_results(records, dict(zip(CLASSES, [3, 1, 7, 5, 2])), rng)  # 1-based clusters, 1 used
    r1 = hungarian_evaluate(one, records, CLASSES, num_clusters=k)
    r0 = hungarian_evaluate(_zero_based(one), records, CLASSES, num_clusters=k)
    assert r1["cluster_numbering"] == "1-based" and r0["cluster_numbering"] == "0-based"
    assert r1["cluster_ids"] == list(range(1, k + 1)) and r0["cluster_ids"] == list(range(k))
    assert r0["mean"] == r1["mean"] == pytest.approx({"AP50": 100, "AP75": 100, "AP50:95": 100})
    assert {c: e["AP50"] for c, e in r0["per_class"].items()} == {c: e["AP50"] for c, e in r1["per_class"].items()}
    assert r0["matching"] == {c: m - 1 for c, m in r1["matching"].items()}
    assert r0["ap50_matrix"] == r1["ap50_matrix"]
    assert r0["n_detections"] == r1["n_detections"] == len(one)   # nothing dropped
    assert "0-based" in to_markdown(r0)
    # a 0-based file without cluster 0 reads as 1-based: named one off, but nothing is dropped and
    # the scores are the same (the matching does not depend on the names of the clusters)
    no_one = [d for d in one if d["category_id"] != 1]
    a = hungarian_evaluate(no_one, records, CLASSES, num_clusters=k)
    b = hungarian_evaluate(_zero_based(no_one), records, CLASSES, num_clusters=k)
    assert a["mean"] == b["mean"] and a["n_detections"] == b["n_detections"] == len(no_one)


def test_cluster_zero_is_never_dropped_silently():
    records = scene(seed=6)
    rng = np.random.default_rng(7)
    zero = _zero_based(gt_as_coco_results(records, {c: i + 1 for i, c in enumerate(CLASSES)}, rng))
    # what evaluate_cad passed for num_clusters=K until now: cluster_ids 1..K -> the 0s are named, not dropped
    with pytest.raises(ValueError, match=r"cluster ids 0 that are not among the evaluated clusters"):
        hungarian_evaluate(zero, records, CLASSES, cluster_ids=range(1, len(CLASSES) + 1))
    # ids fitting neither 1..K nor 0..K-1
    bad = zero + [dict(zero[0], category_id=12)]
    with pytest.raises(ValueError, match=r"num_clusters=5 means cluster ids 1\.\.5 \(or 0\.\.4\).* ids 12 outside"):
        hungarian_evaluate(bad, records, CLASSES, num_clusters=5)
    with pytest.raises(ValueError, match="not both"):
        hungarian_evaluate(zero, records, CLASSES, cluster_ids=[0, 1], num_clusters=2)


def test_table_and_galleries_name_clusters_alike(tmp_path):
    """The table shows the category id and name of a cluster as its gallery file and title do."""
    from PIL import Image

    from pipeline.clustering.labels import cluster_categories
    from pipeline.viz.gallery import write_cluster_galleries

    k = 10
    cats = cluster_categories(k)                            # id c + 1, name cluster_<c>
    records = scene(seed=8)
    rng = np.random.default_rng(9)
    labels = {"cat": 5, "dog": 7, "car": 3, "boat": 1, "bird": 9}  # K-means labels; category id = label + 1
    res = hungarian_evaluate(gt_as_coco_results(records, {c: v + 1 for c, v in labels.items()}, rng), records,
                             CLASSES, num_clusters=k, category_names={c["id"]: c["name"] for c in cats})
    md = to_markdown(res)
    assert "| bird | cluster_9 (id 10) |" in md
    crop = np.zeros((8, 8, 3), np.uint8)
    paths = write_cluster_galleries({lab: [crop] for lab in range(k)}, tmp_path, sizes={9: 3}, categories=cats)
    by_name = {p.stem: p for p in paths}
    for cls, e in res["per_class"].items():
        cell = md.split(f"| {cls} | ")[1].split(" |")[0]
        name = cell.split(" (")[0]
        with Image.open(by_name[name]) as im:                # the gallery of the matched cluster ...
            assert im.text["Title"].startswith(cell)         # ... is captioned as in the table
        assert e["cluster"] == int(cell.split("(id ")[1].rstrip(")"))
    with Image.open(by_name["cluster_9"]) as im:
        assert im.text["Title"] == "cluster_9 (id 10) (3 boxes)"
    # default naming (no categories given) follows the same convention
    assert [p.name for p in write_cluster_galleries({9: [crop]}, tmp_path / "d")] == ["cluster_9.png"]
    # without names, the table shows the ids
    assert "| bird | 10 |" in to_markdown(dict(res, category_names={}))


# ----------------------------------------------------------------------------- difficult objects
def test_difficult_removed_or_ignored_and_crowd_as_difficult():
    recs = [ImageRecord("1", 1, "1.jpg", 300, 300, [[0, 0, 100, 100], [150, 150, 250, 250]], ["cat", "cat"],
                        crowd=[False, True]),
            ImageRecord("2", 2, "2.jpg", 300, 300, [[0, 0, 100, 100], [150, 150, 250, 250]], ["cat", "cat"],
                        difficult=[False, True])]
    # one hit per image on the easy cat, one (higher-scored) on the difficult / crowd one
    res = [{"image_id": i, "category_id": 1, "score": s, "bbox": b} for i in (1, 2)
           for s, b in ((0.9, [150, 150, 100, 100]), (0.5, [0, 0, 100, 100]))]
    ignore = hungarian_evaluate(res, recs, ["cat"])
    assert ignore["per_class"]["cat"]["AP50"] == pytest.approx(100)  # hits on difficult/crowd are ignored
    removed = hungarian_evaluate(res, recs, ["cat"], voc_difficult="remove")
    # the difficult box is removed (its hit is a FP), the crowd box stays an ignore region:
    # order 0.9 ignored(crowd), 0.9 FP, 0.5 TP, 0.5 TP -> precision 1/2, 2/3 at recall 1/2, 1
    assert removed["per_class"]["cat"]["AP50"] == pytest.approx(100 * (0.5 * 2 / 3 + 0.5 * 2 / 3))
    both = hungarian_evaluate(res, recs, ["cat"], voc_difficult="remove", crowd_is_difficult=True)
    assert both["per_class"]["cat"]["AP50"] == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 0.5))
    assert both["voc_difficult"] == "remove" and both["crowd_is_difficult"] is True
    assert recs[0].crowd.tolist() == [False, True] and len(recs[1].boxes) == 2  # inputs untouched
    with pytest.raises(ValueError, match="voc_difficult"):
        hungarian_evaluate(res, recs, ["cat"], voc_difficult="drop")


def test_coco_gt_file_difficult_choices(tmp_path):
    """gt=<COCO json>: difficult objects marked 'difficult': 1, or iscrowd=1 with crowd_is_difficult."""
    import json

    from pipeline.data.coco import load_coco

    def gt_file(mark):
        anns = [{"id": 1, "image_id": 1, "bbox": [0, 0, 100, 100], "category_id": 1, "iscrowd": 0},
                {"id": 2, "image_id": 1, "bbox": [150, 150, 100, 100], "category_id": 1, "iscrowd": 0, **mark}]
        f = tmp_path / f"gt{len(list(tmp_path.iterdir()))}.json"
        f.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg", "width": 300, "height": 300}],
                                 "annotations": anns, "categories": [{"id": 1, "name": "cat"}]}))
        return load_coco(tmp_path, ann_file=str(f), image_dir=str(tmp_path)).records

    res = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [150, 150, 100, 100]},
           {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 100, 100]}]
    ap = {}
    for mark, kw in [({"difficult": 1}, {}), ({"iscrowd": 1}, {"crowd_is_difficult": True})]:
        recs = gt_file(mark)
        ap[str(mark)] = [hungarian_evaluate(res, recs, ["cat"], voc_difficult=m, **kw)["per_class"]["cat"]["AP50"]
                         for m in ("ignore", "remove")]
    assert ap["{'difficult': 1}"] == ap["{'iscrowd': 1}"] == [pytest.approx(100), pytest.approx(50)]


def test_matched_mask_ap_by_hand():
    """Class a found exactly by cluster 1's mask; class b by cluster 2's mask of IoU 5/8: a hit at IoU 0.50,
    0.55, 0.60 only, so mask AP 30 and mask AP50 100 for b."""
    from pipeline.data.records import ImageRecord
    from pipeline.evaluation.matched_masks import matched_mask_ap
    from pipeline.masks import encode_rle

    def rect(y0, y1, x0, x1):
        m = np.zeros((40, 40), bool)
        m[y0:y1, x0:x1] = True
        return m

    a, b, b_det = rect(0, 10, 0, 10), rect(20, 36, 20, 30), rect(20, 30, 20, 30)
    rec = ImageRecord("1", 1, "x.png", width=40, height=40, boxes=[[0, 0, 10, 10], [20, 20, 30, 36]],
                      classes=["a", "b"], segmentations=[encode_rle(a), encode_rle(b)])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9, "segmentation": encode_rle(a)},
            {"image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "score": 0.8,
             "segmentation": encode_rle(b_det)}]
    got = matched_mask_ap(dets, [rec], {"a": 1, "b": 2})
    assert got["a"] == {"mask_AP50": pytest.approx(100.0), "mask_AP": pytest.approx(100.0)}
    assert got["b"] == {"mask_AP50": pytest.approx(100.0), "mask_AP": pytest.approx(30.0)}
    swapped = matched_mask_ap(dets, [rec], {"a": 2, "b": 1})
    assert swapped["a"]["mask_AP"] == 0.0 and swapped["b"]["mask_AP"] == 0.0
