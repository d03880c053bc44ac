"""The one life cycle of a stage that writes results: plan -> up to date / report only / run -> metrics.json ->
manifest.json -> summary. Plain parameters: the stage passes its folder, its resolved config (for the
manifest) and callables that do its work."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.artifacts import (begin_replacement, commit_replacement, read_json, recover_replacement, write_json,
                                write_manifest)
from pipeline.rerun import plan_rerun


@dataclass
class Produced:
    """What a stage's work returns to :func:`run_stage`: its metrics (written as metrics.json), the files it
    made (for the summary), the input files the manifest hashes, and the manifest's stage-specific entries."""
    metrics: dict
    made: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    weights_sha256: str | None = None


def run_stage(stage_dir: Path, *, stage: str, config: dict, artifact: dict, report: dict, outputs: tuple[str, ...],
              produce: Callable[[Path], Produced | None], summary: Callable[[Path, dict, list[str] | None], None],
              redo_report: Callable[[Path, tuple], Produced] | None = None, inputs: dict | None = None,
              keep: bool = False, force: bool = False, complete: bool = True,
              redo_says: str = "redoing the report; the results are kept", redo_hint: str = "") -> dict | None:
    """:func:`pipeline.rerun.plan_rerun` decides: "up to date" prints the stored summary (and ``redo_hint``,
    how to redo it anyway); "report only" calls ``redo_report(dir, changes)`` on the finished results; "run"
    calls ``produce(out_dir)``, where ``out_dir`` is ``stage_dir``, or under ``force`` a replacement folder
    beside it, swapped in only once everything is written (``keep``: continue what a killed forced run left
    there). ``produce`` returns None when there is nothing to finalise yet (a shard waiting for the others).
    ``inputs`` describes input hashes for messages (:func:`pipeline.rerun.explain_changes`); ``redo_says`` what a
    report-only rerun does. ``complete=False``: the stage knows its results miss something (a grown image set):
    it runs, however complete its files look. Returns the metrics (None when nothing was finalised)."""
    start = time.time()
    stage_dir = Path(stage_dir)
    recover_replacement(stage_dir)
    plan = plan_rerun(stage_dir, stage=stage, artifact=artifact, report=report, outputs=outputs,
                      force=force or not complete, inputs=inputs)
    if plan.action == "skip":
        print(f"{stage}: {stage_dir} is up to date (same config and inputs, complete){redo_hint and '; ' + redo_hint}.",
              flush=True)
        metrics = read_json(stage_dir / "metrics.json")
        summary(stage_dir, metrics, None)
        return metrics
    if plan.action == "report" and redo_report is not None:
        print(f"{stage}: only report settings changed ({'; '.join(plan.report_changes)}): {redo_says}.", flush=True)
        out_dir, done = stage_dir, redo_report(stage_dir, plan.report_changes)
    else:
        out_dir = begin_replacement(stage_dir, keep=keep) if force else stage_dir
        done = produce(out_dir)
        if done is None:
            return None
    write_json(out_dir / "metrics.json", done.metrics)
    write_manifest(out_dir, stage=stage, config=config, inputs=done.inputs, weights_sha256=done.weights_sha256,
                   start_time=start, end_time=time.time(), extra={**done.extra, "artifact": artifact, "report": report})
    if out_dir != stage_dir:
        commit_replacement(stage_dir, out_dir)
    summary(stage_dir, done.metrics, [*done.made, "metrics.json", "manifest.json"])
    return done.metrics
