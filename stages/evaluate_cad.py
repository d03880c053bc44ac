"""Stage evaluate-cad: Hungarian cluster-to-class matching and per-class AP of a class-aware detector.

    python -m stages.evaluate_cad dataset=voc07 dataset.image_set=test
    python -m stages.evaluate_cad evaluate_cad.detections=dets.json evaluate_cad.gt=instances_val.json

``evaluate_cad.detections``: COCO results json (``image_id`` = the GT's integer image id, ``category_id`` = cluster,
``bbox`` xywh, ``score``). When it is not given (null), ``${stage_dir}/detections.json`` is used, first
produced by running the train-cad detector ``${evaluate_cad.model}`` on the evaluated images when it is missing or
came from another model or image list (``inference.json`` records which). Writes ``${stage_dir}/``:
metrics.json (AP50 matrix, matching, per-class APs, means, unmatched clusters/classes), hungarian.md
(the table) and manifest.json.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.data.coco import load_coco
from pipeline.detection.evaluate import cached_detections, evaluate_clusters
from pipeline.evaluation.detections import ap_mode
from stages.common import StageError, build_dataset_from_cfg, run_guarded, to_container
from stages.config import stage_main

_HINT = "Run `make train-cad` first, or pass evaluate_cad.detections=<COCO results json>."


def load_gt(cfg: DictConfig):
    """(records, class names, description) from ``gt`` (a COCO instances json) or the configured dataset."""
    if cfg.evaluate_cad.gt:
        gt = Path(str(cfg.evaluate_cad.gt))
        ds = load_coco(gt.parent, ann_file=str(gt), image_dir=str(gt.parent), name=gt.stem)
        return ds.records, ds.class_names, str(gt)
    ds = build_dataset_from_cfg(cfg)
    if not ds.has_gt or not ds.class_names:
        raise StageError(f"dataset {cfg.dataset.name} has no class labels to evaluate against; choose a labelled "
                         "dataset (e.g. dataset=voc07 dataset.image_set=test) or pass evaluate_cad.gt=<COCO instances json>.")
    return ds.records, ds.class_names, f"{cfg.dataset.name}:{cfg.dataset.get('image_set')}"


def run(cfg: DictConfig) -> dict:
    start, e, stage_dir = time.time(), cfg.evaluate_cad, Path(cfg.stage_dir)
    records, class_names, gt_desc = load_gt(cfg)
    if e.detections:
        det_path, inferred = Path(str(e.detections)), None
    else:  # the train-cad model's detections, made when missing or of another model or image list
        det_path, inferred = cached_detections(
            stage_dir, Path(str(e.model)), records, gt_desc, mode="coco" if e.gt else ap_mode(cfg.dataset.kind),
            batch_size=int(cfg.eval.batch_size), device=str(cfg.device), progress=bool(cfg.progress), hint=_HINT,
            model_hint="Rerun `make train-cad`.")
    k = None if e.num_clusters is None else int(e.num_clusters)
    return evaluate_clusters(det_path, inferred, records, class_names, gt_desc, stage_dir, config=to_container(cfg),
                             start=start, hint=_HINT, num_clusters=k, voc_difficult=str(e.voc_difficult),
                             crowd_is_difficult=bool(e.gt_crowd_is_difficult), iou_thresholds=list(e.iou_thresholds))


@stage_main("evaluate_cad")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
