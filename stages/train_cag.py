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
writes. Reruns (pipeline/detection/run.py): the same config and input is "up to date" (nothing done); a change
of eval/viz/progress/num_workers/device only redoes inference, scores and pictures on the existing model.pt;
a change of what decides the weights over an existing model.pt is an error naming the changed keys
(force=true, make FORCE=1, retrains).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from stages.config import stage_main
from stages.common import run_guarded
from stages.train_common import run_training

# What decides the weights (stored in model.pt, compared on reruns); eval/viz/progress/num_workers/device
# decide only the report (stages.train_common.REPORT_KEYS).
ARTIFACT_KEYS = ("dataset", "backbone", "miner", "detector", "schedule", "seed", "train_cag.boxes",
               "train_cag.image_root", "train_cag.min_box_size")


def run(cfg: DictConfig) -> dict | None:
    c = cfg.train_cag
    path = Path(str(c.boxes)) if c.get("boxes") else Path(str(cfg.inputs.pseudo_boxes))
    return run_training(cfg, section="train_cag", in_path=path, input_name="pseudo_boxes", what="pseudo-box file",
                        hint="Run `make mine` (python -m stages.mine) with the same dataset/backbone first, or "
                             "set train_cag.boxes=<COCO json>.",
                        producer="" if c.get("boxes") else " (written by `make mine`)",
                        class_agnostic=True, artifact_keys=ARTIFACT_KEYS)


@stage_main("train_cag")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
