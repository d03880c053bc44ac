"""`make status`: which stages of a dataset/backbone are done, stale (inputs changed) or missing.

    python -m stages.status dataset=voc07 backbone=dino_vits16
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.status import format_status, pipeline_status
from stages.config import stage_main


@stage_main("status")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.base_dir)
    digest = n = None
    try:  # the dataset tells which annotations the stages scored against and how many images a run has
        from pipeline.status import annotations_digest
        from stages.common import build_dataset_from_cfg

        ds = build_dataset_from_cfg(cfg)
        digest, n = (annotations_digest(ds.records) if ds.has_gt else None), len(ds)
    except Exception as e:  # noqa: BLE001 - status still reports what it can without the data
        print(f"(dataset not readable here, annotations and image counts not checked: {e})")
    print(f"{cfg.dataset.name} / {cfg.backbone.name}  ({root})")
    print(format_status(pipeline_status(root, annotations_digest=digest, n_images=n)))


if __name__ == "__main__":
    main()
