"""`make status`: the state of each stage of a dataset/backbone (done, partial, failed, stale, missing) and,
for each that is not done, the command that brings it up to date.

    python -m stages.status dataset=voc07 backbone=dino_vits16

The states are :func:`pipeline.status.pipeline_status`'s, decided with the same dataset facts as `make
report` (:func:`pipeline.status.dataset_facts`) and the same folders (the config's ``dirs`` map for every
chain, :func:`stages.locations.layout_of`), so the two never disagree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from pipeline.status import StageState, dataset_facts, format_status, pipeline_status
from stages.config import stage_main
from stages.locations import layout_of


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[StageState]:
    """Print the states; ``overrides``: the command line's Hydra overrides (the experiment's ARGS, which the
    printed commands repeat; None: ARGS naming the dataset, backbone and output root)."""
    from stages.common import build_dataset_from_cfg

    root = Path(cfg.base_dir)
    facts, note = dataset_facts(lambda: build_dataset_from_cfg(cfg))
    if note:
        print(f"({note})")
    states = pipeline_status(root, layout_of(cfg), **facts)
    print(f"{cfg.dataset.name} / {cfg.backbone.name}  ({root})")
    print(format_status(states, overrides))
    return states


@stage_main("status")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
