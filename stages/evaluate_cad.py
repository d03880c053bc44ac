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

from pipeline.artifacts import read_json, write_json, write_text
from stages.config import stage_main
from stages.common import StageError, Timer, build_dataset_from_cfg, resolve_device, run_guarded, to_container


def load_gt(cfg: DictConfig):
    """(records, class names, description) from ``gt`` (a COCO instances json) or the configured dataset."""
    if cfg.evaluate_cad.gt:
        from pipeline.data.coco import load_coco

        gt = Path(str(cfg.evaluate_cad.gt))
        ds = load_coco(gt.parent, ann_file=str(gt), image_dir=str(gt.parent), name=gt.stem)
        return ds.records, ds.class_names, str(gt)
    ds = build_dataset_from_cfg(cfg)
    if not ds.has_gt or not ds.class_names:
        raise StageError(f"dataset {cfg.dataset.name} has no class labels to evaluate against; choose a labelled "
                         "dataset (e.g. dataset=voc07 dataset.image_set=test) or pass evaluate_cad.gt=<COCO instances json>.")
    return ds.records, ds.class_names, f"{cfg.dataset.name}:{cfg.dataset.get('image_set')}"


def _images_key(records) -> str:
    from pipeline.artifacts import sha256_json

    return sha256_json(sorted((int(r.coco_id), str(Path(r.path).resolve())) for r in records))


def detections_file(cfg: DictConfig, records, gt_desc: str, stage_dir: Path) -> tuple[Path, dict | None]:
    """The detections to evaluate, and (when the train-cad model produced them) its inference record."""
    from pipeline.artifacts import sha256_file

    if cfg.evaluate_cad.detections:
        return Path(str(cfg.evaluate_cad.detections)), None
    det_path, side_path, model_path = stage_dir / "detections.json", stage_dir / "inference.json", Path(str(cfg.evaluate_cad.model))
    if not model_path.is_file():
        if det_path.is_file():
            return det_path, None
        raise FileNotFoundError(f"no detections to evaluate: neither {det_path} nor the class-aware detector "
                                f"{model_path} exists. Run `make train-cad` first, or pass evaluate_cad.detections=<COCO results json>.")
    side = {"model": str(model_path), "model_sha256": sha256_file(model_path), "images_key": _images_key(records)}
    prev = read_json(side_path, "inference record") if side_path.is_file() else {}
    if det_path.is_file() and all(prev.get(k) == v for k, v in side.items() if k != "model"):
        print(f"evaluate-cad: reusing {det_path} (made by the same {model_path} on the same images)", flush=True)
        return det_path, prev
    from pipeline.detection.checkpoint import load_detector
    from pipeline.evaluation.detections import ap_mode
    from pipeline.provenance import random_init as is_random
    from stages.detector_common import detect_score_draw, warn_if_random

    model, spec, meta = load_detector(model_path, hint="Rerun `make train-cad`.")
    iteration = meta["iteration"]
    random_init = is_random(spec=spec, provenance=meta["provenance"])
    warn_if_random(spec, model_path, random_init, "pseudo-labels")
    cats = list(spec.category_ids)
    print(f"evaluate-cad: running {model_path} (iteration {iteration}) on {len(records)} images of {gt_desc}", flush=True)
    ev = detect_score_draw(model, records, stage_dir, category_ids=cats,
                           mode="coco" if cfg.evaluate_cad.gt else ap_mode(cfg.dataset.kind),
                           device=resolve_device(str(cfg.device)), batch_size=int(cfg.eval.batch_size),
                           progress=bool(cfg.progress), random_init=random_init)
    names = list(spec.category_names or [])
    side.update({"iteration": iteration, "category_ids": cats, "gt": gt_desc,
                 "category_names": {str(c): n for c, n in zip(cats, names)},
                 "random_init": random_init, "class_agnostic": ev})
    write_json(side_path, side)
    return det_path, side


def run(cfg: DictConfig) -> dict:
    from pipeline.artifacts import write_manifest
    from pipeline.evaluation.hungarian import hungarian_evaluate, to_markdown

    timer = Timer()
    stage_dir = Path(cfg.stage_dir)
    records, class_names, gt_desc = load_gt(cfg)
    det_path, inferred = detections_file(cfg, records, gt_desc, stage_dir)
    dets = read_json(det_path, "detections file", hint="Run `make train-cad` first, or pass "
                     "evaluate_cad.detections=<COCO results json>.")
    if not isinstance(dets, list):
        raise StageError(f"{det_path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    e = cfg.evaluate_cad
    k = e.num_clusters
    names = {int(c): n for c, n in ((inferred or {}).get("category_names") or {}).items()}
    try:
        res = hungarian_evaluate(dets, records, class_names,
                                 cluster_ids=None if k is not None else (inferred or {}).get("category_ids"),
                                 num_clusters=None if k is None else int(k), category_names=names or None,
                                 voc_difficult=str(e.voc_difficult), crowd_is_difficult=bool(e.gt_crowd_is_difficult),
                                 iou_thresholds=list(e.iou_thresholds))
    except ValueError as e:
        raise StageError(f"{det_path}: {e}") from None
    res.update({"detections": str(det_path), "gt": gt_desc})
    if inferred is not None:
        res["inference"] = inferred
    write_json(stage_dir / "metrics.json", res)
    table = to_markdown(res, names or None)
    write_text(stage_dir / "hungarian.md", f"# Hungarian evaluation\n\nDetections: `{det_path}`  \nGT: `{gt_desc}`"
               f"\n\n{table}")
    inputs = {"detections": det_path, **({"model": Path(inferred["model"])} if inferred else {})}
    write_manifest(stage_dir, stage="evaluate_cad", config=to_container(cfg), inputs=inputs,
                   start_time=timer.start, end_time=time.time())
    made = "detections.json, inference.json, " if inferred else ""
    tag = "\n[RANDOM WEIGHTS: smoke test, not a result]" if (inferred or {}).get("random_init") else ""
    print(table + f"\nmatching (class -> cluster): {res['matching']}{tag}\nartifacts: {stage_dir}/ ({made}metrics.json, "
          "hungarian.md, manifest.json)", flush=True)
    return res


@stage_main("evaluate_cad")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
