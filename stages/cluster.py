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

import dataclasses
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import read_coco_boxes, read_json
from pipeline.clustering.run import cluster_boxes, format_cluster_summary, redraw_galleries
from pipeline.clustering.settings import ClusteringSettings
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
    records = build_dataset_from_cfg(cfg).records
    root = Path(records_root(records))
    try:
        coco = detections_to_boxes(results, records, root, float(cfg.cluster.score_threshold),
                                   info={"source_file": str(path)})
    except ValueError as e:
        raise StageError(f"{path}: {str(e).replace('score_threshold', 'cluster.score_threshold')}") from None
    return coco, root, path


def _redraw_galleries(cfg: DictConfig, stage_dir: Path) -> Produced:
    """Only report settings changed: new galleries from the existing pseudo_labels.json (left untouched)."""
    metrics, info = redraw_galleries(stage_dir, int(cfg.viz.gallery_size), int(cfg.viz.thumb))
    return _produced(cfg, metrics, Path(info["clustering"]["input"]), info["clustering"]["backbone"],
                     info.get("features_key"), made=["galleries/"])


def _gt_records(cfg: DictConfig):
    """The dataset's records when it has GT classes (for purity/NMI), else None."""
    from pipeline.data import DatasetError

    try:
        ds = build_dataset_from_cfg(cfg)
    except (DatasetError, FileNotFoundError):  # boxes of another dataset (cluster.boxes=...): no GT here
        return None
    return ds.records if ds.has_gt else None


def _produced(cfg: DictConfig, metrics: dict, in_path: Path, desc: dict, key, made: list[str]) -> Produced:
    return Produced(metrics, made, inputs={"boxes": in_path}, weights_sha256=desc.get("weights_sha256"),
                    extra={"features_dir": str(cfg.dirs.cluster_features), "features_key": key,
                           "random_init": random_init(backbone=desc)})


def run(cfg: DictConfig) -> dict:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are noise here
    c = cfg.cluster
    in_path = _input_path(cfg)
    producer = "" if c.boxes else (" (written by `make mine`)" if c.source == "lost" else " (written by `make train-cag`)")
    return run_stage(cfg, stage="cluster", artifact=_artifact(cfg, in_path), outputs=OUTPUTS,
                     report={"viz": {"gallery_size": int(cfg.viz.gallery_size), "thumb": int(cfg.viz.thumb)}},
                     inputs={"input.boxes": f"the input {in_path}{producer}"}, produce=lambda out: _cluster(cfg, out),
                     redo_report=lambda d, _changes: _redraw_galleries(cfg, d),
                     redo_says="redrawing the galleries; pseudo_labels.json is unchanged",
                     summary=lambda d, m, _made: print(format_cluster_summary(d, Path(cfg.dirs.cluster_features), m),
                                                                 flush=True))


def _cluster(cfg: DictConfig, out_dir: Path) -> Produced:
    """Crop features (cached, keyed by what produced them: reused even when forced) -> K-means -> pseudo-labels."""
    from pipeline.clustering import extract_box_features

    c = cfg.cluster
    coco, root, in_path = load_boxes(cfg)
    if not coco["annotations"]:
        raise StageError(f"{in_path} holds no boxes to cluster.")
    if len(coco["annotations"]) < int(c.k):
        kept = f" scoring >= cluster.score_threshold={c.score_threshold}" if c.source == "cag" else ""
        raise StageError(f"cluster.k={c.k} but {in_path} holds only {len(coco['annotations'])} boxes{kept}: lower "
                         "cluster.k.")
    backbone = build_backbone_from_cfg(cfg, resolve_device(cfg.device))
    desc, t0 = backbone.describe(), time.time()
    feats = extract_box_features(coco, root, backbone, batch_size=int(c.batch_size),
                                 cache_dir=Path(cfg.dirs.cluster_features), progress=bool(cfg.progress),
                                 short_side=int(c.short_side), max_size=None if c.max_size is None else int(c.max_size))
    if len(feats.index) < int(c.k):
        raise StageError(f"cluster.k={c.k} but only {len(feats.index)} boxes could be cropped "
                         f"({len(feats.skipped)} skipped): lower cluster.k.")
    settings = ClusteringSettings(**{f.name: c[f.name] for f in dataclasses.fields(ClusteringSettings)})
    try:
        metrics = cluster_boxes(coco, root, feats, settings, out_dir, source=str(c.source), in_path=in_path,
                                backbone_desc=desc, feature_seconds=time.time() - t0,
                                gallery_size=int(cfg.viz.gallery_size), thumb=int(cfg.viz.thumb),
                                gt_records=_gt_records(cfg))
    except ValueError as e:  # the library names its parameters; here they are cluster.* keys
        raise StageError(f"cluster.{e}") from None
    return _produced(cfg, metrics, in_path, desc, feats.key, made=["pseudo_labels.json", "galleries/"])


@stage_main("cluster")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
