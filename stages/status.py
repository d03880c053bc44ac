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
    print(f"{cfg.dataset.name} / {cfg.backbone.name}  ({root})")
    print(format_status(pipeline_status(root)))


if __name__ == "__main__":
    main()
