"""Stage train-cag: a class-agnostic Faster R-CNN trained on the mined pseudo-boxes (LOST's CAD).

    python -m stages.train_cag dataset=voc07                                 # detector=r50_c4, DINO ResNet-50
    python -m stages.train_cag detector=mobilenet_fpn schedule=smoke         # CPU smoke run (random init)
    python -m stages.train_cag train_cag.resume=true                         # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=4 -m stages.train_cag dataset=voc07   # DDP (make train-cag NPROC=4)

Reads ``${inputs.pseudo_boxes}`` (the mine stage's pseudo_boxes.json) or ``train_cag.boxes`` (any COCO
json; images under ``train_cag.image_root``, else its ``info.image_root``, else its directory). Writes
``${stage_dir}/``: model.pt, metrics.jsonl (trainer), detections.json (COCO results on the training images:
``image_id`` = the json's image ids; what ``cluster.source=cag`` reads), metrics.json (training summary,
dropped boxes/images, LOST+CAD top-1 CorLoc and class-agnostic AP50/AP against the dataset's GT), viz/,
manifest.json. Under torchrun every process trains (the global batch is split); only rank 0 evaluates and
writes. A complete run with the same config and input is skipped (force=true redoes it).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from stages.config import stage_main
from stages.common import run_guarded
from stages.train_common import run_training

FINGERPRINT = ("dataset", "backbone", "miner", "detector", "schedule", "seed", "train_cag.boxes",
               "train_cag.image_root", "train_cag.min_box_size", "eval", "viz")


def run(cfg: DictConfig) -> dict | None:
    c = cfg.train_cag
    path = Path(str(c.boxes)) if c.get("boxes") else Path(str(cfg.inputs.pseudo_boxes))
    return run_training(cfg, stage="train_cag", section="train_cag", in_path=path, what="pseudo-box file",
                        hint="Run `make mine` (python -m stages.mine) with the same dataset/backbone first, or "
                             "set train_cag.boxes=<COCO json>.",
                        class_agnostic=True, fingerprint_keys=FINGERPRINT)


@stage_main("train_cag")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
