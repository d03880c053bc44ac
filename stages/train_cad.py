"""Stage train-cad: a class-aware Faster R-CNN (K classes = the K-means clusters) on pseudo_labels.json.

    python -m stages.train_cad dataset=voc07 train_cad.cluster_run=lost/k20
    python -m stages.train_cad detector=mobilenet_fpn schedule=smoke train_cad.cluster_run=lost/k2
    torchrun --standalone --nproc_per_node=4 -m stages.train_cad dataset=voc07   # DDP (make train-cad NPROC=4)

Reads ``${inputs.pseudo_labels}`` (default ``cluster/${train_cad.cluster_run}/pseudo_labels.json``) or
``train_cad.labels``. Same trainer, artifacts and rerun rules as train-cag (pipeline/detection/run.py), in
``${stage_dir}`` (``cad/``): detections.json holds the training images' detections with ``category_id`` =
the cluster category ids of pseudo_labels.json (what ``make evaluate-cad`` matches to classes).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from stages.config import stage_main
from stages.common import run_guarded
from stages.train_common import run_training

# What decides the weights (stored in model.pt, compared on reruns); eval/viz/progress/num_workers/device
# decide only the report (stages.train_common.REPORT_KEYS).
ARTIFACT_KEYS = ("dataset", "backbone", "detector", "schedule", "seed", "train_cad.labels", "train_cad.cluster_run",
               "train_cad.image_root", "train_cad.min_box_size")


def run(cfg: DictConfig) -> dict | None:
    c = cfg.train_cad
    path = Path(str(c.labels)) if c.get("labels") else Path(str(cfg.inputs.pseudo_labels))
    return run_training(cfg, section="train_cad", in_path=path, input_name="pseudo_labels", what="pseudo-label file",
                        hint="Run `make cluster` (python -m stages.cluster) first, pick its run with "
                             "train_cad.cluster_run=<source>/k<K>, or set train_cad.labels=<COCO json>.",
                        producer="" if c.get("labels") else " (written by `make cluster`)",
                        class_agnostic=False, artifact_keys=ARTIFACT_KEYS)


@stage_main("train_cad")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
