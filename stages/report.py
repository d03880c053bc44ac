"""Stage report: the static HTML page of an experiment, from the artifacts its stages wrote.

    python -m stages.report dataset=voc07 backbone=dino_vits16

Reads the folders of every chain (the config's ``dirs`` map, :func:`stages.locations.layout_of`) and writes
``${dirs.report}/``: index.html, summary.json and img/ (plots and copies of the stages' pictures), a
self-contained folder that opens from disk. Reruns nothing. Every stage's state is `make status`'s (the
same function, the same dataset facts); a section of a stage that is not done says so and gives the command
that brings it up to date, with the ARGS the report was made with.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from stages.common import run_guarded, to_container
from stages.config import stage_main
from stages.locations import layout_of


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict:
    """Build the report; ``overrides``: the command line's Hydra overrides (the experiment's ARGS, repeated
    in the commands the report suggests; None: ARGS naming the dataset, backbone and output root)."""
    from pipeline.report import build_report, format_report_summary
    from pipeline.status import dataset_facts
    from stages.common import build_dataset_from_cfg

    d = to_container(cfg.dataset)
    facts, note = dataset_facts(lambda: build_dataset_from_cfg(cfg))
    if note:
        print(f"({note})", flush=True)
    summary = build_report(Path(cfg.base_dir), Path(cfg.stage_dir), dataset=d, layout=layout_of(cfg),
                           max_pictures=int(cfg.report.max_pictures), n_worst=int(cfg.report.worst),
                           args=overrides, **facts)
    print(format_report_summary(summary), flush=True)
    return summary


@stage_main("report")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_guarded(functools.partial(run, overrides=list(HydraConfig.get().overrides.task)), cfg)


if __name__ == "__main__":
    main()
