"""Stage evaluate-cad: Hungarian cluster-to-class matching and per-class AP of a class-aware detector.

    python -m stages.evaluate_cad dataset=voc07 dataset.image_set=test
    python -m stages.evaluate_cad detections=dets.json gt=instances_val.json   # any detector / GT

``detections``: COCO results json (``image_id`` = the GT's integer image id, ``category_id`` = cluster,
``bbox`` xywh, ``score``). Writes ``${stage_dir}/``: metrics.json (AP50 matrix, matching, per-class APs,
means, unmatched clusters/classes), hungarian.md (the table) and manifest.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.artifacts import read_json, write_json, write_text
from stages.common import Timer, build_dataset_from_cfg, run_guarded, to_container


def load_gt(cfg: DictConfig):
    """(records, class names, description) from ``gt`` (a COCO instances json) or the configured dataset."""
    if cfg.get("gt"):
        from pipeline.data.coco import load_coco

        gt = Path(str(cfg.gt))
        ds = load_coco(gt.parent, ann_file=str(gt), image_dir=str(gt.parent), name=gt.stem)
        return ds.records, ds.class_names, str(gt)
    ds = build_dataset_from_cfg(cfg)
    if not ds.has_gt or not ds.class_names:
        raise SystemExit(f"dataset {cfg.dataset.name} has no class labels to evaluate against; choose a labelled "
                         "dataset (e.g. dataset=voc07 dataset.image_set=test) or pass gt=<COCO instances json>.")
    return ds.records, ds.class_names, f"{cfg.dataset.name}:{cfg.dataset.get('image_set')}"


def run(cfg: DictConfig) -> dict:
    from pipeline.artifacts import write_manifest
    from pipeline.evaluation.hungarian import hungarian_evaluate, to_markdown

    timer = Timer()
    det_path = Path(str(cfg.detections))
    dets = read_json(det_path, "detections file", hint="Run `make train-cad` first, or pass detections=<COCO "
                     "results json>.")
    if not isinstance(dets, list):
        raise SystemExit(f"{det_path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    records, class_names, gt_desc = load_gt(cfg)
    k = cfg.get("num_clusters")
    try:
        res = hungarian_evaluate(dets, records, class_names, cluster_ids=None if k is None else range(1, int(k) + 1),
                                 iou_thresholds=list(cfg.iou_thresholds))
    except ValueError as e:
        raise SystemExit(f"{det_path}: {e}") from None
    res.update({"detections": str(det_path), "gt": gt_desc})
    stage_dir = Path(cfg.stage_dir)
    write_json(stage_dir / "metrics.json", res)
    table = to_markdown(res)
    write_text(stage_dir / "hungarian.md", f"# Hungarian evaluation\n\nDetections: `{det_path}`  \nGT: `{gt_desc}`"
               f"\n\n{table}")
    write_manifest(stage_dir, stage="evaluate_cad", config=to_container(cfg), inputs={"detections": det_path},
                   start_time=timer.start, end_time=time.time())
    print(table + f"\nmatching (class -> cluster): {res['matching']}\nartifacts: {stage_dir}/ (metrics.json, "
          "hungarian.md, manifest.json)", flush=True)
    return res


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate_cad")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
