"""Hungarian evaluation of a class-aware detector trained on cluster pseudo-labels.

As LOST's ``evaluate_unsupervised_detection_voc.py``: the AP50 of every (GT class, cluster) pair,
each cluster's detections scored as that class (VOC AP, :mod:`pipeline.evaluation.voc_ap`), is the
reward of an assignment solved with ``scipy.optimize.linear_sum_assignment(maximize=True)``; each
class is then reported with the AP50, AP75 and AP50:95 (mean over IoU 0.50:0.05:0.95) of its
cluster. Differences from the reference, which asserts K >= classes: K < classes is allowed and
the classes left without a cluster count with AP 0 in the means; a class with no non-difficult GT
box (possible on small subsets) has no AP and is left out of the matching and the means. All APs
are reported in percent.

Cluster ids: a detection's ``category_id`` is its cluster. With ``num_clusters=K`` the clusters are
1..K (COCO category ids, what the cluster stage writes: category id ``c + 1`` named ``cluster_<c>``)
or 0..K-1 (raw K-means labels, as LOST's and detectron2's own result files number them): the
numbering is read from the ids present (a 0 means 0-based) and recorded in ``cluster_numbering``.
A detection whose id fits neither, or is not in an explicit ``cluster_ids``, is an error naming the
ids: no detection is ever dropped silently. ``category_names`` ({id: name}) puts the names next to
the ids in the table, the same captions as the cluster galleries (``cluster_9 (id 10)``).

Difficult objects: ``voc_difficult="ignore"`` (default, the devkit's rule) or ``"remove"``, see
:func:`pipeline.evaluation.voc_ap.apply_difficult` (``crowd_is_difficult`` for COCO GT files that
mark difficult objects ``iscrowd=1``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.boxes import xywh_to_xyxy
from pipeline.data.records import ImageRecord
from pipeline.evaluation.voc_ap import (DetectionOverlaps, GroundTruth, apply_difficult, class_ap,
                                        flatten_detections)

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def detections_from_coco_results(results: Sequence[dict], records: Iterable[ImageRecord]) -> dict:
    """COCO results list (``image_id`` = record ``coco_id``, ``bbox`` xywh, ``score``, ``category_id``)
    -> ``{record.image_id: {"boxes", "scores", "labels"}}`` with labels = category ids."""
    by_coco = {int(r.coco_id): r.image_id for r in records}
    by_str = {v: v for v in by_coco.values()}
    out: dict[str, dict[str, list]] = {}
    for i, d in enumerate(results):
        missing = [k for k in ("image_id", "bbox", "score", "category_id") if k not in d]
        if missing:
            raise ValueError(f"detection #{i} lacks {missing}: expected COCO results format "
                             "[{image_id, category_id, bbox: [x, y, w, h], score}, ...]")
        im = d["image_id"]
        key = by_coco.get(im) if isinstance(im, (int, np.integer)) else by_str.get(str(im))
        if key is None and isinstance(im, str) and im.isdigit():
            key = by_coco.get(int(im))
        if key is None:
            raise ValueError(f"detection #{i} has image_id {im!r}, which is not in the ground-truth dataset: "
                             "the detections were made on another dataset or split.")
        e = out.setdefault(key, {"boxes": [], "scores": [], "labels": []})
        e["boxes"].append(xywh_to_xyxy([d["bbox"]])[0]), e["scores"].append(float(d["score"]))
        e["labels"].append(int(d["category_id"]))
    return {k: {"boxes": np.asarray(v["boxes"]).reshape(-1, 4), "scores": np.asarray(v["scores"]),
                "labels": np.asarray(v["labels"])} for k, v in out.items()}


def _ids_text(ids: Sequence[int], limit: int = 10) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} ids)" if len(ids) > limit else "")


def resolve_cluster_ids(present: Iterable[int], num_clusters: int | None = None,
                        cluster_ids: Sequence[int] | None = None) -> tuple[list[int], str | None]:
    """(the clusters to match, their numbering "1-based" / "0-based" / None) for the ids ``present``
    in the detections; raises ValueError naming every id that would otherwise be dropped.

    ``cluster_ids`` given: exactly those (ids present outside them are an error). ``num_clusters=K``:
    1..K, or 0..K-1 when a 0 is present (1-based wins when both fit, e.g. ids 1..K-1: the cluster
    stage's category ids are 1-based; a 0-based file without cluster 0 is then named one off, which
    changes no score: the matching does not depend on the clusters' names). Neither: the ids present.
    """
    present = sorted({int(c) for c in present})
    if cluster_ids is not None:
        ids = [int(c) for c in cluster_ids]
        stray = sorted(set(present) - set(ids))
        if stray:
            raise ValueError(f"detections have cluster ids {_ids_text(stray)} that are not among the evaluated "
                             f"clusters ({_ids_text(ids)}); they would be dropped. Check the numbering of the "
                             "results file (category_id = cluster) against num_clusters / the model's categories.")
        return ids, None
    if num_clusters is None:
        return present, None
    k = int(num_clusters)
    if k < 1:
        raise ValueError(f"num_clusters must be >= 1, got {k}")
    one, zero = set(range(1, k + 1)), set(range(k))
    if set(present) <= one and 0 not in present:
        return sorted(one), "1-based"
    if set(present) <= zero:
        return sorted(zero), "0-based"
    stray = sorted(set(present) - (zero if 0 in present else one))
    raise ValueError(f"num_clusters={k} means cluster ids 1..{k} (or 0..{k - 1}), but the detections have "
                     f"ids {_ids_text(stray)} outside that range (ids present: {_ids_text(present)}): wrong "
                     "num_clusters, or a results file of another clustering.")


def hungarian_evaluate(
    detections: Sequence[dict] | Mapping[str, Mapping[str, np.ndarray]],
    records: Iterable[ImageRecord],
    class_names: Sequence[str] | None = None,
    cluster_ids: Sequence[int] | None = None,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    *,
    num_clusters: int | None = None,
    category_names: Mapping[int, str] | None = None,
    voc_difficult: str = "ignore",
    crowd_is_difficult: bool = False,
) -> dict:
    """Match clusters to GT classes by AP50 and report the matched APs (percent).

    ``detections``: COCO results list or ``{image_id: {"boxes", "scores", "labels"}}``; a label is a
    cluster id. Clusters: ``cluster_ids``, else 1..K / 0..K-1 for ``num_clusters=K`` (see
    :func:`resolve_cluster_ids`), else the labels present; a cluster with no detection has AP 0.
    ``category_names`` ({cluster id: name}) are recorded for :func:`to_markdown`.
    ``voc_difficult`` / ``crowd_is_difficult``: see :func:`pipeline.evaluation.voc_ap.apply_difficult`.
    ``iou_thresholds`` must contain 0.5 and 0.75. Returns a JSON-ready dict: ``ap50_matrix``
    (classes x clusters), ``matching`` {class: cluster}, ``per_class``, ``mean``,
    ``unmatched_clusters``, ``unmatched_classes``, ``classes_without_gt``, ``cluster_numbering``.
    """
    records = apply_difficult(records, voc_difficult, crowd_is_difficult)
    if not isinstance(detections, Mapping):
        detections = detections_from_coco_results(detections, records)
    thresholds = [round(float(t), 4) for t in iou_thresholds]
    if 0.5 not in thresholds or 0.75 not in thresholds:
        raise ValueError(f"iou_thresholds must include 0.5 and 0.75, got {thresholds}")
    if cluster_ids is not None and num_clusters is not None:
        raise ValueError("give cluster_ids or num_clusters, not both")
    gt = GroundTruth.from_records(records, list(class_names) if class_names is not None else None)
    present = {int(l) for d in detections.values() for l in np.asarray(d["labels"]).reshape(-1)}
    cluster_ids, numbering = resolve_cluster_ids(present, num_clusters, cluster_ids)
    n_cls, n_clu = len(gt.class_names), len(cluster_ids)
    if n_cls == 0 or n_clu == 0:
        raise ValueError(f"nothing to match: {n_cls} GT classes and {n_clu} clusters with detections")

    overlaps = []
    for c in cluster_ids:
        image, boxes, scores = flatten_detections(gt, detections, label=c)
        overlaps.append(DetectionOverlaps.build(gt, image, boxes, scores))
    with_gt = [i for i in range(n_cls) if gt.npos(i) > 0]
    ap50 = np.full((n_cls, n_clu), np.nan)
    for i in with_gt:
        for j in range(n_clu):
            ap50[i, j] = class_ap(gt, overlaps[j], i, 0.5)

    rows, cols = linear_sum_assignment(ap50[with_gt], maximize=True)
    match = {with_gt[r]: c for r, c in zip(rows, cols)}
    per_class, sums = {}, {"AP50": [], "AP75": [], "AP50:95": []}
    for i in with_gt:
        name = gt.class_names[i]
        if i in match:
            j = match[i]
            aps = {t: 100.0 * class_ap(gt, overlaps[j], i, t) for t in thresholds}
            entry = {"cluster": cluster_ids[j], "AP50": aps[0.5], "AP75": aps[0.75],
                     "AP50:95": float(np.mean(list(aps.values())))}
        else:
            entry = {"cluster": None, "AP50": 0.0, "AP75": 0.0, "AP50:95": 0.0}
        per_class[name] = entry
        for k in sums:
            sums[k].append(entry[k])
    matched_clusters = {cluster_ids[j] for j in match.values()}
    return {
        "class_names": list(gt.class_names),
        "cluster_ids": cluster_ids,
        "ap50_matrix": np.where(np.isnan(ap50), None, np.round(100 * ap50, 4)).tolist(),
        "matching": {gt.class_names[i]: cluster_ids[j] for i, j in sorted(match.items())},
        "per_class": per_class,
        "mean": {k: float(np.mean(v)) for k, v in sums.items()},
        "unmatched_clusters": [c for c in cluster_ids if c not in matched_clusters],
        "unmatched_classes": [gt.class_names[i] for i in with_gt if i not in match],
        "classes_without_gt": [gt.class_names[i] for i in range(n_cls) if i not in with_gt],
        "iou_thresholds": thresholds,
        "cluster_numbering": numbering,
        "category_names": {str(c): str(category_names[c]) for c in cluster_ids
                           if category_names is not None and c in category_names},
        "voc_difficult": voc_difficult,
        "crowd_is_difficult": bool(crowd_is_difficult),
        "n_images": len(records),
        "n_detections": int(sum(len(np.asarray(d["scores"]).reshape(-1)) for d in detections.values())),
    }


def to_markdown(result: dict, category_names: Mapping[int, str] | None = None) -> str:
    """Per-class table (class, matched cluster, AP50, AP75, AP50:95), the mean, and what is unmatched.

    A cluster is shown as its category id, with its name when known (``category_names`` {id: name},
    else the result's ``category_names``): ``cluster_9 (id 10)``, the caption of its gallery
    ``cluster_9.png`` (:func:`pipeline.names.cluster_caption`)."""
    from pipeline.names import cluster_caption

    names = {int(k): v for k, v in (result.get("category_names") or {}).items()}
    names.update({int(k): v for k, v in (category_names or {}).items()})

    def show(c) -> str:
        return "-" if c is None else cluster_caption(int(c), names.get(int(c)))

    lines = ["| class | cluster | AP50 | AP75 | AP50:95 |", "|---|---:|---:|---:|---:|"]
    for name, e in result["per_class"].items():
        lines.append(f"| {name} | {show(e['cluster'])} | {e['AP50']:.2f} | {e['AP75']:.2f} | {e['AP50:95']:.2f} |")
    m = result["mean"]
    lines.append(f"| **mean** |  | **{m['AP50']:.2f}** | **{m['AP75']:.2f}** | **{m['AP50:95']:.2f}** |")
    lines.append("")
    lines.append("Unmatched clusters: " + (", ".join(show(c) for c in result["unmatched_clusters"]) or "none"))
    lines.append("Unmatched classes (AP 0): " + (", ".join(result["unmatched_classes"]) or "none"))
    if result["classes_without_gt"]:
        lines.append("Classes without ground truth (left out): " + ", ".join(result["classes_without_gt"]))
    if result.get("cluster_numbering") == "0-based":
        lines.append("Cluster ids are 0-based (as in the results file).")
    return "\n".join(lines) + "\n"
