"""Stage self-train: CutLER's self-training rounds on train-cag's detector (``self_train.rounds=N``).

    python -m stages.self_train dataset=coco miner=maskcut detector=cascade_mask_r50_fpn self_train.rounds=2

Round r (``pipeline.detection.self_training``): round r-1's detector (round 0: ``${dirs.cag}``/model.pt) predicts
on the training images, the predictions scoring >= ``self_train.score_thresholds[r-1]`` are kept and every previous
pseudo-object they miss is added back (``${dirs.cag}/round<r>/pseudo_labels.json``), then a detector is trained on
them from round r-1's weights (train-cag's settings, DropLoss off) in ``round<r>/``: model.pt, metrics.json,
detections.json, viz/, manifest.json. Each round reruns like train-cag: up to date, ``self_train.resume=true``,
FORCE=1 redoes every round.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.detection.self_training import self_train
from stages.common import run_guarded
from stages.config import stage_main
from stages.train_common import train_cag


def run(cfg: DictConfig) -> list | None:
    settings = OmegaConf.to_object(cfg.self_train)
    return train_cag(cfg, job=lambda base: self_train(base, settings), says="self_train")


@stage_main("self_train")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
