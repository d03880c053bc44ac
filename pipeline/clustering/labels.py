"""``pseudo_labels.json``: the pseudo-box COCO dataset with category = cluster id."""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from pipeline.clustering.kmeans import KMeansResult


def cluster_categories(k: int) -> list[dict]:
    """COCO categories for ``k`` clusters: id ``c + 1``, name ``cluster_<c>`` (c = 0..k-1)."""
    return [{"id": c + 1, "name": f"cluster_{c}", "supercategory": "cluster"} for c in range(k)]


def make_pseudo_labels(
    pseudo_boxes: dict,
    index: Sequence[tuple[int, int]],
    result: KMeansResult,
    extra_info: dict | None = None,
) -> dict:
    """Relabel the annotations of ``pseudo_boxes`` by cluster.

    ``index[i] = (annotation id, image id)`` of ``result.labels[i]`` (from
    :func:`pipeline.clustering.features.extract_box_features`). Every annotation keeps its fields
    (bbox, score, seed...) and gets ``category_id = cluster + 1``; annotations absent from
    ``index`` (boxes whose image could not be read) are dropped and counted in
    ``info.n_dropped``. ``info`` keeps the input's info and adds ``k``, ``centroids`` (k x D),
    ``sizes``, ``inertia``, ``kmeans_seed`` and ``extra_info``.
    """
    labels = np.asarray(result.labels)
    if len(index) != len(labels):
        raise ValueError(f"{len(index)} indexed boxes but {len(labels)} cluster labels: the feature index "
                         "and the clustering do not belong together.")
    k = int(result.centroids.shape[0])
    cluster_of = {}
    for (ann_id, image_id), lab in zip(index, labels):
        cluster_of[(int(ann_id), int(image_id))] = int(lab)
    annotations = []
    for a in pseudo_boxes.get("annotations", []):
        key = (int(a["id"]), int(a["image_id"]))
        if key in cluster_of:
            a = copy.deepcopy(a)
            a["category_id"] = cluster_of.pop(key) + 1
            annotations.append(a)
    if cluster_of:
        missing = next(iter(cluster_of))
        raise ValueError(f"{len(cluster_of)} clustered boxes are not in the pseudo-box file (e.g. annotation "
                         f"{missing[0]} of image {missing[1]}): the feature cache is stale; delete it and rerun.")
    info = dict(copy.deepcopy(pseudo_boxes.get("info", {})))
    info.update({
        "k": k,
        "centroids": np.asarray(result.centroids, dtype=np.float64).round(6).tolist(),
        "sizes": [int(s) for s in result.sizes],
        "inertia": float(result.inertia),
        "kmeans_seed": int(result.seed),
        "n_dropped": len(pseudo_boxes.get("annotations", [])) - len(annotations),
        **(extra_info or {}),
    })
    return {
        "info": info,
        "images": copy.deepcopy(pseudo_boxes.get("images", [])),
        "annotations": annotations,
        "categories": cluster_categories(k),
    }
