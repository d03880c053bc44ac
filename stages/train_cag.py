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

from omegaconf import DictConfig

from stages.config import stage_main
from stages.common import run_guarded
from stages.train_common import train_cag


def run(cfg: DictConfig) -> dict | None:
    return train_cag(cfg)  # what decides the weights: stages.train_common.CAG_ARTIFACT_KEYS


@stage_main("train_cag")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
