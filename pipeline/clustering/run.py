"""The cluster stage's work on built objects: box features -> K-means -> ``pseudo_labels.json``, galleries,
cluster quality and the metrics; the galleries redrawn from a finished ``pseudo_labels.json``; the summary.

Plain parameters (:class:`~pipeline.clustering.settings.ClusteringSettings`, folders, a built backbone); the
cluster stage reads the config and checks the settings against its input first."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.artifacts import read_json, write_json
from pipeline.clustering.features import BoxFeatures, load_box_crops, prepare_features
from pipeline.clustering.kmeans import kmeans
from pipeline.clustering.labels import make_pseudo_labels
from pipeline.clustering.settings import ClusteringSettings
from pipeline.provenance import random_init

RANDOM_NOTE = "RANDOM WEIGHTS: not a result"


def write_galleries(coco: dict, root: Path, index: Sequence, labels: np.ndarray, out_dir: Path, n: int, thumb: int,
                    note: str = "") -> None:
    """``out_dir``/cluster_<k>.png: the first ``n`` crops of every cluster (``index[i]`` = (annotation id, image
    id) of ``labels[i]``), replacing what was there."""
    from pipeline.viz.gallery import write_cluster_galleries

    firsts: dict[int, list[int]] = {}
    for (ann_id, _), lab in zip(index, labels):
        if len(firsts.setdefault(int(lab), [])) < n:
            firsts[int(lab)].append(int(ann_id))
    crops = _with_masks(coco, load_box_crops(coco, root, [a for ids in firsts.values() for a in ids]))
    shutil.rmtree(out_dir, ignore_errors=True)
    sizes = {k: int((labels == k).sum()) for k in firsts}
    write_cluster_galleries({k: [crops[a] for a in ids if a in crops] for k, ids in firsts.items()}, out_dir,
                            sizes=sizes, n=n, thumb=thumb, note=note)


def _with_masks(coco: dict, crops: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each crop with its object's mask (the annotation's ``segmentation``) tinted over it, when it has one that
    fits its image; other crops as they are."""
    from pipeline.boxes import xywh_to_xyxy
    from pipeline.clustering.crops import box_pixel_bounds
    from pipeline.masks import decode_rle, segmentation_problem, to_rle
    from pipeline.viz.masks import tint_masks

    images = {int(im["id"]): im for im in coco.get("images", [])}
    out = dict(crops)
    for a in coco.get("annotations", []):
        crop, seg, im = crops.get(int(a["id"])), a.get("segmentation"), images.get(int(a["image_id"]))
        if crop is None or not seg or im is None or segmentation_problem(seg, im["height"], im["width"]):
            continue
        mask = decode_rle(to_rle(seg, im["height"], im["width"]))
        x1, y1, x2, y2 = box_pixel_bounds(xywh_to_xyxy([a["bbox"]])[0], mask.shape[1], mask.shape[0])
        tinted = np.asarray(crop, dtype=np.float32).copy()
        if tint_masks(tinted, [mask[y1:y2, x1:x2]], outline=1) == 0:
            out[int(a["id"])] = np.clip(tinted, 0, 255).astype(np.uint8)
    return out


def cluster_boxes(coco: dict, root: Path, feats: BoxFeatures, settings: ClusteringSettings, out_dir: Path, *,
                  source: str, in_path: Path, backbone_desc: dict, feature_seconds: float, gallery_size: int,
                  thumb: int, gt_records=None) -> dict:
    """K-means on the crop features ``feats`` of ``coco``'s boxes -> ``out_dir``/pseudo_labels.json and
    galleries/; the metrics (with purity/NMI against ``gt_records``' classes when given). ValueError (naming
    the parameter) when K-means cannot run with these settings."""
    s = settings
    x = prepare_features(feats.features, whiten_features=bool(s.whiten), normalize=bool(s.l2_normalize))
    t0 = time.time()
    result = kmeans(x, int(s.k), seed=int(s.seed), n_init=int(s.n_init), iters=int(s.iters))
    t_km = time.time() - t0
    is_random = random_init(backbone=backbone_desc)
    clustering = {"source": source, "input": str(in_path), "k": int(s.k), "seed": int(s.seed),
                  "n_init": int(s.n_init), "iters": int(s.iters), "whiten": bool(s.whiten),
                  "l2_normalize": bool(s.l2_normalize), "short_side": int(s.short_side), "backbone": backbone_desc,
                  "random_init": is_random}
    labels_coco = make_pseudo_labels(coco, feats.index, result, extra_info={
        "image_root": str(root), "clustering": clustering, "features_key": feats.key})
    write_json(out_dir / "pseudo_labels.json", labels_coco)
    write_galleries(coco, root, feats.index, result.labels, out_dir / "galleries", gallery_size, thumb,
                    note=RANDOM_NOTE if is_random else "")
    quality = None
    if gt_records is not None:
        from pipeline.evaluation.cluster_quality import cluster_quality_for_boxes

        quality = cluster_quality_for_boxes(labels_coco, gt_records)
    return {"k": int(s.k), "boxes": len(feats.index), "skipped": len(feats.skipped),
            "skipped_boxes": feats.skipped[:100], "inertia": result.inertia,
            "restart_inertias": result.restart_inertias, "best_seed": result.seed,
            "sizes": [int(n) for n in result.sizes], "empty_clusters": int((result.sizes == 0).sum()),
            "features_from_cache": feats.from_cache, "feature_seconds": round(feature_seconds, 3),
            "kmeans_seconds": round(t_km, 3), "random_init": is_random, "source": source,
            "cluster_quality": quality}


def redraw_galleries(stage_dir: Path, gallery_size: int, thumb: int) -> tuple[dict, dict]:
    """New galleries from a finished ``pseudo_labels.json`` (left untouched): (its metrics, its ``info``)."""
    labels_coco = read_json(stage_dir / "pseudo_labels.json", "pseudo-label file")
    metrics = read_json(stage_dir / "metrics.json")
    index = [(int(a["id"]), int(a["image_id"])) for a in labels_coco["annotations"]]
    labels = np.array([int(a["category_id"]) - 1 for a in labels_coco["annotations"]], dtype=np.int64)
    root = Path(labels_coco["info"].get("image_root") or ".")
    write_galleries(labels_coco, root, index, labels, stage_dir / "galleries", gallery_size, thumb,
                    note=RANDOM_NOTE if metrics.get("random_init") else "")
    return metrics, labels_coco["info"]


def format_cluster_summary(stage_dir: Path, feat_dir: Path, m: dict) -> str:
    how = "loaded from cache" if m["features_from_cache"] else f"computed in {m['feature_seconds']:.1f} s"
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if m["random_init"] else ""
    q = m.get("cluster_quality")
    quality = "" if not q or q.get("purity") is None else (
        f"\npurity {q['purity']:.3f}, NMI {q['nmi']:.3f} against the GT classes ({q['matched']}/{q['boxes']} boxes "
        f"matched a GT box){tag}")
    return (f"cluster: {m['boxes']} boxes ({m['skipped']} skipped), features {how} ({feat_dir})\n"
            f"K-means k={m['k']}: inertia {m['inertia']:.4f}, sizes {m['sizes']}{tag}{quality}\n"
            f"artifacts: {stage_dir}/ (pseudo_labels.json, metrics.json, manifest.json, galleries/)")
