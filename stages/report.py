"""Stage report: the static HTML page of an experiment, from the artifacts its stages wrote.

    python -m stages.report dataset=voc07 backbone=dino_vits16

Reads ``${base_dir}`` (= output_root/dataset/backbone: mine*/, cag/, cluster/, cad/) and writes
``${dirs.report}/``: index.html, summary.json and img/ (plots and copies of the stages' pictures), a
self-contained folder that opens from disk. Reruns nothing; stale and missing stages are marked.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from stages.common import run_guarded, to_container
from stages.config import stage_main


def run(cfg: DictConfig) -> dict:
    from pipeline.report import build_report

    d = to_container(cfg.dataset)
    summary = build_report(Path(cfg.base_dir), Path(cfg.stage_dir), dataset=d,
                           max_pictures=int(cfg.report.max_pictures), n_worst=int(cfg.report.worst))
    prov = summary["provenance"]
    print(f"report: {summary['index']}", flush=True)
    print(f"sections: {', '.join(summary['sections'])}", flush=True)
    if prov["missing"]:
        print("missing stages: " + ", ".join(f"{m['stage']} ({m['run']})" for m in prov["missing"]), flush=True)
    if prov["stale"]:
        print("STALE stages (an input changed since they ran): " + ", ".join(prov["stale"]), flush=True)
    if summary["random_init"]:
        print("[RANDOM WEIGHTS: the report shows a smoke test, not results]", flush=True)
    return summary


@stage_main("report")
def main(cfg: DictConfig) -> None:
    run_guarded(run, cfg)


if __name__ == "__main__":
    main()
