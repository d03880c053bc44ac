"""Stage evaluate-cag: the trained class-agnostic detector on any dataset: detections, CorLoc, AP.

    python -m stages.evaluate_cag dataset=voc07 dataset.image_set=test   # the voc07 (trainval) model on test
    python -m stages.evaluate_cag evaluate_cag.model=/path/model.pt dataset=coco20k

Loads ``${evaluate_cag.model}`` (default ``${base_dir}/cag/model.pt``: ``base_dir`` uses dataset.name, so the
model trained on trainval is found), runs it on every image of the configured dataset and writes
``${dirs.cag_eval}`` (``cag/${evaluate_cag.name}``, default ``eval_<image_set>``): detections.json (COCO results,
``image_id`` = the dataset's integer ids), metrics.json (LOST+CAD top-1 CorLoc, class-agnostic AP50/AP:
VOC style with difficult objects removed for VOC, COCO style otherwise), viz/, manifest.json.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import write_json, write_manifest
from pipeline.detection.checkpoint import load_detector
from pipeline.evaluation.detections import ap_mode
from pipeline.provenance import random_init as is_random
from stages.common import StageError, Timer, build_dataset_from_cfg, resolve_device, run_guarded, to_container
from stages.config import stage_main
from stages.detector_common import detect_score_draw, format_eval, warn_if_random


def run(cfg: DictConfig) -> dict:
    timer = Timer()
    model_path = Path(str(cfg.evaluate_cag.model))
    model, spec, meta = load_detector(
        model_path, hint="Run `make train-cag` with the same dataset/backbone first, or pass evaluate_cag.model=<model.pt>.")
    iteration = meta["iteration"]
    random_init = is_random(spec=spec, provenance=meta["provenance"])
    warn_if_random(spec, model_path, random_init)
    dataset = build_dataset_from_cfg(cfg)
    if len(dataset) == 0:
        raise StageError(f"dataset {cfg.dataset.name} at {cfg.dataset.root} has no images.")
    out = Path(cfg.stage_dir)
    ev = detect_score_draw(model, dataset.records, out, category_ids=spec.category_ids,
                           mode=ap_mode(cfg.dataset.kind), voc_difficult=str(cfg.eval.voc_difficult),
                           device=resolve_device(str(cfg.device)), batch_size=int(cfg.eval.batch_size),
                           progress=bool(cfg.progress), viz_images=int(cfg.viz.num_images),
                           viz_min_score=float(cfg.viz.min_score), random_init=random_init)
    metrics = {**ev, "model": str(model_path), "model_iteration": iteration,
               "model_stage": meta["provenance"].get("stage"), "dataset": str(cfg.dataset.name),
               "image_set": cfg.dataset.get("image_set"), "detector": spec.preset, "random_init": random_init}
    write_json(out / "metrics.json", metrics)
    write_manifest(out, stage="evaluate_cag", config=to_container(cfg), inputs={"model": model_path},
                   weights_sha256=spec.weights_sha256, start_time=timer.start, end_time=time.time())
    print("\n".join([f"evaluate-cag: {model_path} (iteration {iteration}) on {cfg.dataset.name}:"
                     f"{cfg.dataset.get('image_set')}", *format_eval(ev, random_init),
                     f"artifacts: {out}/ (detections.json, metrics.json, viz/, manifest.json)"]), flush=True)
    return metrics


@stage_main("evaluate_cag")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
