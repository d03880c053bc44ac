"""Stage cluster: pseudo-box crops -> DINO CLS features (cached) -> K-means -> pseudo_labels.json.

    python -m stages.cluster dataset=voc07 cluster.k=20
    python -m stages.cluster -m cluster.k=10,20,40        # features computed once, one output per K
    python -m stages.cluster cluster.source=cag cluster.score_threshold=0.7

Reads ``${inputs.pseudo_boxes}`` (the mine stage's pseudo_boxes.json) or ``${inputs.cag_detections}`` (the
class-agnostic detector's COCO results). Writes ``${dirs.cluster_features}/`` (features.npy +
features_index.json, shared by every K) and ``${dirs.cluster}/``: pseudo_labels.json, metrics.json,
manifest.json, galleries/cluster_<k>.png. A rerun with only ``viz.*`` changed redraws the galleries and
leaves pseudo_labels.json untouched; another clustering setting on a finished run is refused (FORCE=1).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline.artifacts import read_coco_boxes, read_json, write_json
from pipeline.provenance import random_init
from pipeline.rerun import input_hashes
from stages.common import (Produced, StageError, build_backbone_from_cfg, build_dataset_from_cfg, coco_image_root,
                           dataset_identity, resolve_device, run_guarded, run_stage, to_container)
from stages.config import stage_main

OUTPUTS = ("pseudo_labels.json", "metrics.json")


def _artifact(cfg: DictConfig, in_path: Path) -> dict:
    """What decides the clusters: the input boxes (file hash), the dataset and backbone, the clustering."""
    c = to_container(cfg.cluster)
    c.pop("run_name", None)
    return {"input": input_hashes(boxes=in_path), "dataset": dataset_identity(cfg),
            "backbone": to_container(cfg.backbone), "cluster": c}


def _report(cfg: DictConfig) -> dict:
    return {"viz": {"gallery_size": int(cfg.viz.gallery_size), "thumb": int(cfg.viz.thumb)}}


def _input_path(cfg: DictConfig) -> Path:
    c = cfg.cluster
    return Path(c.boxes) if c.boxes else Path(cfg.inputs.pseudo_boxes if c.source == "lost" else cfg.inputs.cag_detections)


def load_boxes(cfg: DictConfig) -> tuple[dict, Path, Path]:
    """The COCO dataset of boxes to cluster, its image root and the input file."""
    from pipeline.clustering.sources import detections_to_boxes
    from pipeline.data.paths import records_root

    path = _input_path(cfg)
    if cfg.cluster.source == "lost":
        coco = read_coco_boxes(path, "pseudo-box file", hint="Run `make mine` (python -m stages.mine) with the same "
                               "dataset/backbone first, or set cluster.boxes=<file>.")
        return coco, coco_image_root(cfg, coco), path
    results = read_json(path, "detections file", hint="Run `make train-cag` first, or set cluster.boxes=<file> "
                        "(COCO results json).")
    if not isinstance(results, list):
        raise StageError(f"{path}: expected a COCO results list [{{image_id, bbox, score, ...}}, ...]")
    records = build_dataset_from_cfg(cfg).records
    root = Path(records_root(records))
    try:
        coco = detections_to_boxes(results, records, root, float(cfg.cluster.score_threshold),
                                   info={"source_file": str(path)})
    except ValueError as e:
        raise StageError(f"{path}: {e}") from None
    if results and not coco["annotations"]:
        best = max(float(d["score"]) for d in results)
        raise StageError(f"{path} holds {len(results):,} detections, but none scores >= cluster.score_threshold="
                         f"{cfg.cluster.score_threshold} (the best scores {best:.2f}): lower cluster.score_threshold")
    return coco, root, path


def galleries(coco: dict, root: Path, index: list, labels: np.ndarray, out_dir: Path, n: int, thumb: int,
              note: str = "") -> None:
    from pipeline.clustering.features import load_box_crops
    from pipeline.viz.gallery import write_cluster_galleries

    firsts: dict[int, list[int]] = {}
    for (ann_id, _), lab in zip(index, labels):
        if len(firsts.setdefault(int(lab), [])) < n:
            firsts[int(lab)].append(int(ann_id))
    crops = load_box_crops(coco, root, [a for ids in firsts.values() for a in ids])
    shutil.rmtree(out_dir, ignore_errors=True)
    sizes = {k: int((labels == k).sum()) for k in firsts}
    write_cluster_galleries({k: [crops[a] for a in ids if a in crops] for k, ids in firsts.items()}, out_dir,
                            sizes=sizes, n=n, thumb=thumb, note=note)


def _redraw_galleries(cfg: DictConfig, stage_dir: Path) -> Produced:
    """Only report settings changed: new galleries from the existing pseudo_labels.json (left untouched)."""
    labels_coco = read_json(stage_dir / "pseudo_labels.json", "pseudo-label file")
    metrics = read_json(stage_dir / "metrics.json")
    index = [(int(a["id"]), int(a["image_id"])) for a in labels_coco["annotations"]]
    labels = np.array([int(a["category_id"]) - 1 for a in labels_coco["annotations"]], dtype=np.int64)
    root = Path(labels_coco["info"].get("image_root") or ".")
    galleries(labels_coco, root, index, labels, stage_dir / "galleries", int(cfg.viz.gallery_size),
              int(cfg.viz.thumb), note="RANDOM WEIGHTS: not a result" if metrics.get("random_init") else "")
    info = labels_coco["info"]
    return _produced(cfg, metrics, Path(info["clustering"]["input"]), info["clustering"]["backbone"],
                     info.get("features_key"), made=["galleries/"])


def _cluster_quality(cfg: DictConfig, labels_coco: dict) -> dict | None:
    """Purity and NMI of the clusters against the dataset's GT classes (each box takes the class of its best
    GT box at IoU >= 0.5; see pipeline.evaluation.cluster_quality), None without GT."""
    from pipeline.data import DatasetError
    from pipeline.evaluation.cluster_quality import cluster_quality_for_boxes

    try:
        ds = build_dataset_from_cfg(cfg)
    except (DatasetError, FileNotFoundError):  # boxes of another dataset (cluster.boxes=...): no GT here
        return None
    return cluster_quality_for_boxes(labels_coco, ds.records) if ds.has_gt else None


def _produced(cfg: DictConfig, metrics: dict, in_path: Path, desc: dict, key, made: list[str]) -> Produced:
    return Produced(metrics, made, inputs={"boxes": in_path}, weights_sha256=desc.get("weights_sha256"),
                    extra={"features_dir": str(cfg.dirs.cluster_features), "features_key": key,
                           "random_init": random_init(backbone=desc)})


def run(cfg: DictConfig) -> dict:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are noise here
    c = cfg.cluster
    in_path = _input_path(cfg)
    producer = "" if c.boxes else (" (written by `make mine`)" if c.source == "lost" else " (written by `make train-cag`)")
    return run_stage(cfg, stage="cluster", artifact=_artifact(cfg, in_path), report=_report(cfg), outputs=OUTPUTS,
                     inputs={"input.boxes": f"the input {in_path}{producer}"}, produce=lambda out: _cluster(cfg, out),
                     redo_report=lambda d, _changes: _redraw_galleries(cfg, d),
                     redo_says="redrawing the galleries; pseudo_labels.json is unchanged",
                     summary=lambda d, m, _made: _print_summary(d, Path(cfg.dirs.cluster_features), m))


def _cluster(cfg: DictConfig, out_dir: Path) -> Produced:
    """Crop features (cached, keyed by what produced them: reused even when forced) -> K-means -> pseudo-labels."""
    from pipeline.clustering import extract_box_features, kmeans, make_pseudo_labels, prepare_features

    c = cfg.cluster
    coco, root, in_path = load_boxes(cfg)
    if not coco["annotations"]:
        raise StageError(f"{in_path} holds no boxes to cluster.")
    if len(coco["annotations"]) < int(c.k):
        kept = f" scoring >= cluster.score_threshold={c.score_threshold}" if c.source == "cag" else ""
        raise StageError(f"cluster.k={c.k} but {in_path} holds only {len(coco['annotations'])} boxes{kept}: lower "
                         "cluster.k.")
    backbone = build_backbone_from_cfg(cfg, resolve_device(cfg.device))
    desc = backbone.describe()
    t0 = time.time()
    feats = extract_box_features(coco, root, backbone, batch_size=int(c.batch_size),
                                 cache_dir=Path(cfg.dirs.cluster_features), progress=bool(cfg.progress),
                                 short_side=int(c.short_side), max_size=None if c.max_size is None else int(c.max_size))
    t_feat = time.time() - t0
    if len(feats.index) < int(c.k):
        raise StageError(f"cluster.k={c.k} but only {len(feats.index)} boxes could be cropped "
                         f"({len(feats.skipped)} skipped): lower cluster.k.")
    x = prepare_features(feats.features, whiten_features=bool(c.whiten), normalize=bool(c.l2_normalize))
    t0 = time.time()
    try:
        result = kmeans(x, int(c.k), seed=int(c.seed), n_init=int(c.n_init), iters=int(c.iters))
    except ValueError as e:  # the library names its parameters; here they are cluster.* keys
        raise StageError(f"cluster.{e}") from None
    t_km = time.time() - t0
    is_random = random_init(backbone=desc)
    clustering = {"source": str(c.source), "input": str(in_path), "k": int(c.k), "seed": int(c.seed),
                  "n_init": int(c.n_init), "iters": int(c.iters), "whiten": bool(c.whiten),
                  "l2_normalize": bool(c.l2_normalize), "short_side": int(c.short_side), "backbone": desc,
                  "random_init": is_random}
    labels_coco = make_pseudo_labels(coco, feats.index, result, extra_info={"image_root": str(root),
                                                                            "clustering": clustering,
                                                                            "features_key": feats.key})
    write_json(out_dir / "pseudo_labels.json", labels_coco)
    galleries(coco, root, feats.index, result.labels, out_dir / "galleries", int(cfg.viz.gallery_size),
              int(cfg.viz.thumb), note="RANDOM WEIGHTS: not a result" if is_random else "")
    metrics = {"k": int(c.k), "boxes": len(feats.index), "skipped": len(feats.skipped),
               "skipped_boxes": feats.skipped[:100], "inertia": result.inertia,
               "restart_inertias": result.restart_inertias, "best_seed": result.seed,
               "sizes": [int(s) for s in result.sizes], "empty_clusters": int((result.sizes == 0).sum()),
               "features_from_cache": feats.from_cache, "feature_seconds": round(t_feat, 3),
               "kmeans_seconds": round(t_km, 3), "random_init": is_random, "source": str(c.source),
               "cluster_quality": _cluster_quality(cfg, labels_coco)}
    return _produced(cfg, metrics, in_path, desc, feats.key, made=["pseudo_labels.json", "galleries/"])


def _print_summary(stage_dir: Path, feat_dir: Path, m: dict) -> None:
    how = "loaded from cache" if m["features_from_cache"] else f"computed in {m['feature_seconds']:.1f} s"
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if m["random_init"] else ""
    q = m.get("cluster_quality")
    quality = "" if not q or q.get("purity") is None else (f"\npurity {q['purity']:.3f}, NMI {q['nmi']:.3f} against the GT classes "
                                f"({q['matched']}/{q['boxes']} boxes matched a GT box){tag}")
    print(f"cluster: {m['boxes']} boxes ({m['skipped']} skipped), features {how} ({feat_dir})\n"
          f"K-means k={m['k']}: inertia {m['inertia']:.4f}, sizes {m['sizes']}{tag}{quality}\n"
          f"artifacts: {stage_dir}/ (pseudo_labels.json, metrics.json, manifest.json, galleries/)", flush=True)


@stage_main("cluster")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
