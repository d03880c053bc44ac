"""How well K-means clusters of pseudo-boxes agree with the GT classes: purity, NMI, a cluster x class table.

Each pseudo-box gets a GT class by :func:`match_boxes_to_classes`: the class of the GT box of highest
IoU in its image, when that IoU is >= 0.5 (difficult boxes included, COCO crowd boxes dropped, as
CorLoc scores); otherwise it has *no class* (it covers background or only part of an object).
**Convention:** boxes without a class are counted in a separate "no class" column of the table
(``unmatched_per_cluster``) and are *excluded* from purity and NMI, which measure how the clusters split
the boxes that do lie on an object; ``matched_fraction`` says how many boxes that is.

:func:`cluster_quality` is the plain measure on two label lists; NMI is the arithmetic-mean normalised
mutual information (the same value as scikit-learn's ``normalized_mutual_info_score`` with its default
``average_method="arithmetic"``, including its special cases).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from pipeline.boxes import iou_matrix, xywh_to_xyxy
from pipeline.data.records import ImageRecord

NO_CLASS = None  # the class of a pseudo-box that matches no GT box


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def cluster_quality(cluster_ids: Sequence, class_ids: Sequence) -> dict:
    """Purity and NMI of a clustering against class labels (two equally long lists; any hashable labels).

    Returns ``purity`` (share of items in their cluster's majority class), ``nmi`` (mutual information /
    arithmetic mean of the two entropies; 1.0 when both labelings have a single label, as scikit-learn),
    ``mutual_info`` (nats), ``n``, ``clusters`` and ``classes`` (sorted labels), ``confusion`` (clusters x
    classes counts, a list of lists) and ``majority`` ({cluster: {"class", "count", "size", "fraction"}}).
    Empty input: purity and nmi are None.
    """
    clusters_in, classes_in = list(cluster_ids), list(class_ids)
    if len(clusters_in) != len(classes_in):
        raise ValueError(f"{len(clusters_in)} cluster ids but {len(classes_in)} class ids")
    clusters = sorted(set(clusters_in), key=lambda v: (str(type(v)), v))
    classes = sorted(set(classes_in), key=lambda v: (str(type(v)), v))
    ci = {c: i for i, c in enumerate(clusters)}
    ki = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    for a, b in zip(clusters_in, classes_in):
        conf[ci[a], ki[b]] += 1
    n = int(conf.sum())
    out = {"n": n, "clusters": clusters, "classes": classes, "confusion": conf.tolist(), "purity": None,
           "nmi": None, "mutual_info": None, "majority": {}}
    if n == 0:
        return out
    out["purity"] = float(conf.max(axis=1).sum() / n)
    for c, row in zip(clusters, conf):
        j = int(row.argmax())
        out["majority"][c] = {"class": classes[j], "count": int(row[j]), "size": int(row.sum()),
                              "fraction": float(row[j] / row.sum())}
    # scikit-learn's special case: both labelings constant -> a perfect match
    if len(clusters) == len(classes) == 1:
        out["nmi"], out["mutual_info"] = 1.0, 0.0
        return out
    p = conf.astype(np.float64) / n
    pu, pv = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * (np.log(p[nz]) - np.log(np.outer(pu, pv)[nz]))).sum())
    mi = max(mi, 0.0)
    out["mutual_info"] = mi
    if mi == 0.0:
        out["nmi"] = 0.0
        return out
    norm = max((_entropy(conf.sum(axis=1)) + _entropy(conf.sum(axis=0))) / 2.0, np.finfo(np.float64).eps)
    out["nmi"] = float(mi / norm)
    return out


def match_boxes_to_classes(coco: dict, records: Iterable[ImageRecord], iou_threshold: float = 0.5) -> list:
    """The GT class of every annotation of a COCO box file (``pseudo_labels.json``), in its order: the
    class of the GT box of highest IoU in the same image (``image_id`` = the record's ``coco_id``) when
    that IoU is >= ``iou_threshold``, else :data:`NO_CLASS` (None). Images unknown to ``records`` or
    without GT give None too."""
    by_id = {int(r.coco_id): r for r in records}
    out = []
    for a in coco.get("annotations", []):
        r = by_id.get(int(a["image_id"]))
        if r is None or not r.has_gt or len(r.boxes) == 0:
            out.append(NO_CLASS)
            continue
        keep = ~np.asarray(r.crowd, bool) if len(r.crowd) else np.ones(len(r.boxes), bool)
        gt = r.boxes[keep]
        names = [c for c, k in zip(r.classes, keep) if k]
        if len(gt) == 0:
            out.append(NO_CLASS)
            continue
        ious = iou_matrix(xywh_to_xyxy([a["bbox"]]), gt)[0]
        j = int(ious.argmax())
        out.append(names[j] if ious[j] >= iou_threshold else NO_CLASS)
    return out


def cluster_quality_for_boxes(coco: dict, records: Iterable[ImageRecord], iou_threshold: float = 0.5) -> dict:
    """:func:`cluster_quality` of a ``pseudo_labels.json`` (category = cluster) against the GT classes.

    Boxes are matched with :func:`match_boxes_to_classes`; the unmatched ones are left out of purity/NMI
    and counted per cluster in ``unmatched_per_cluster`` (the "no class" column). Cluster labels are the
    category names (``cluster_0``...) when the file has them, else the category ids. Adds ``boxes``,
    ``matched``, ``matched_fraction``, ``iou_threshold`` and ``convention``; JSON-ready."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in coco.get("categories", [])}
    cats = [names.get(int(a.get("category_id", 0)), str(a.get("category_id"))) for a in coco.get("annotations", [])]
    classes = match_boxes_to_classes(coco, records, iou_threshold)
    pairs = [(c, k) for c, k in zip(cats, classes) if k is not NO_CLASS]
    q = cluster_quality([c for c, _ in pairs], [k for _, k in pairs])
    all_clusters = sorted(set(cats) | set(names.values()), key=_natural)
    # the table over every cluster (also those with only unmatched boxes), columns = classes present
    order = {c: i for i, c in enumerate(q["clusters"])}
    conf = [q["confusion"][order[c]] if c in order else [0] * len(q["classes"]) for c in all_clusters]
    unmatched = {c: 0 for c in all_clusters}
    for c, k in zip(cats, classes):
        if k is NO_CLASS:
            unmatched[c] += 1
    q.update({"clusters": all_clusters, "confusion": conf,
              "unmatched_per_cluster": [unmatched[c] for c in all_clusters],
              "boxes": len(cats), "matched": len(pairs),
              "matched_fraction": (len(pairs) / len(cats)) if cats else None,
              "iou_threshold": float(iou_threshold),
              "convention": "a box takes the class of its highest-IoU GT box when IoU >= "
                            f"{iou_threshold:g}; boxes without one ('no class') are excluded from purity and NMI"})
    q["majority"] = {str(k): v for k, v in q["majority"].items()}
    return q


def _natural(s):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]
