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

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.detection.evaluate import evaluate_detector
from pipeline.evaluation.detections import ap_mode
from stages.common import StageError, build_dataset_from_cfg, run_guarded, to_container
from stages.config import stage_main


def run(cfg: DictConfig) -> dict:
    def records():
        dataset = build_dataset_from_cfg(cfg)
        if len(dataset) == 0:
            raise StageError(f"dataset {cfg.dataset.name} at {cfg.dataset.root} has no images.")
        return dataset.records

    return evaluate_detector(Path(str(cfg.evaluate_cag.model)), records, Path(cfg.stage_dir),
                             mode=ap_mode(cfg.dataset.kind), evaluation=OmegaConf.to_object(cfg.eval),
                             viz=OmegaConf.to_object(cfg.viz), device=str(cfg.device), progress=bool(cfg.progress),
                             config=to_container(cfg), dataset=str(cfg.dataset.name),
                             image_set=cfg.dataset.get("image_set"), force=bool(cfg.force), redo="FORCE=1 redoes it",
                             hint="Run `make train-cag` with the same dataset/backbone first, or pass "
                                  "evaluate_cag.model=<model.pt>.")


@stage_main("evaluate_cag")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
