"""What a rerun of a stage may do with the results already in its directory.

Every stage splits its settings in two: what decides the *artifact* (data, input file hashes, backbone,
miner, detector, schedule, seeds) and what only decides the *report* (pictures, evaluation, progress,
workers). Both are recorded in the stage's ``manifest.json``. On a rerun of a complete stage:

- same artifact and report settings: nothing to do (``skip``), like make;
- same artifact settings, other report settings: redo only the report (pictures, evaluation) on the
  existing artifact, which is left byte-identical (``report``);
- other artifact settings: refuse with :class:`RerunRefused`, naming the changed keys, unless forced.

``force`` always means: replace the results (``run``).

A training stage also has a checkpoint, which may be partial: :func:`plan_checkpoint` decides what a run does
with it (train from scratch, resume it, or only report on the finished model), and never overwrites it with
another configuration's training. The messages speak of files and settings; the stage adds how to change
them (its config keys), so the library never names one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.artifacts import ArtifactError
from pipeline.diff import diff_values, format_changes  # noqa: F401 - re-exported (pipeline.rerun.diff_values)


class RerunRefused(ArtifactError):
    """A rerun would replace finished results with results of another configuration."""


def explain_changes(changes: Sequence[str], inputs: dict[str, str] | None) -> list[str]:
    """``changes`` (``key: old -> new``) with each changed input hash replaced by what it means: ``inputs``
    maps the dotted key of an input's sha256 (``input_sha256``, ``input.boxes``) to the input's description
    (its file and the step that writes it), so the user reads which upstream result changed, not two hashes."""
    out = []
    for c in changes:
        key = c.split(": ", 1)[0]
        out.append(f"{inputs[key]} changed since" if inputs and key in inputs else c)
    return out


@dataclass(frozen=True)
class Rerun:
    action: str                   # run | report | skip
    report_changes: tuple[str, ...] = ()


def plan_rerun(stage_dir: str | os.PathLike, *, stage: str, artifact: dict, report: dict,
               outputs: Sequence[str], force: bool, inputs: dict[str, str] | None = None) -> Rerun:
    """Decide what a run of ``stage`` does in ``stage_dir`` (see the module docstring).

    ``artifact`` and ``report`` are JSON-able dicts of the settings (input hashes included in
    ``artifact``; ``inputs`` describes them for messages, :func:`explain_changes`). A stage whose ``outputs``
    are not all there has no finished results: ``run`` (the stage's own journal or checkpoint decides whether
    it resumes)."""
    stage_dir = Path(stage_dir)
    if force:
        return Rerun("run")
    man_path = stage_dir / "manifest.json"
    if not man_path.is_file() or not all((stage_dir / o).is_file() for o in outputs):
        return Rerun("run")
    try:
        man = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError):
        man = {}
    artifact, report = _canonical(artifact), _canonical(report)
    if "artifact" not in man:
        raise RerunRefused(f"{stage}: {stage_dir} holds results whose settings are not recorded (an older version "
                           "or a damaged manifest.json); force the rerun to replace them.")
    changed = explain_changes(diff_values(man["artifact"], artifact), inputs)
    if changed:
        raise RerunRefused(f"{stage}: {stage_dir} holds finished results of a different configuration (changed: "
                           f"{format_changes(changed)}). Force the rerun to replace them, or restore "
                           "those settings.")
    report_changes = diff_values(man.get("report"), report)
    return Rerun("report", tuple(report_changes)) if report_changes else Rerun("skip")


class CheckpointRefused(RerunRefused):
    """A checkpoint a run may not continue or overwrite. ``kind``: ``"changed"`` (trained with another
    configuration) or ``"partial"`` (a partial training of this configuration, and no resume asked)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def plan_checkpoint(path: str | os.PathLike, ckpt: dict | None, artifact: dict, *, resume: bool,
                    inputs: dict[str, str] | None = None) -> str:
    """What a training run does with the checkpoint at ``path`` (``ckpt``: its contents, None when there is
    none) given this run's ``artifact`` settings: ``"train"`` (none there), ``"resume"`` (partial, ``resume``,
    same settings) or ``"report"`` (complete, same settings: only the report is redone on it). Anything else
    is a :class:`CheckpointRefused` naming the changed settings (``inputs``: :func:`explain_changes`): a model
    is never overwritten unless forced, which the caller decides."""
    if ckpt is None:
        return "train"
    changes = explain_changes(diff_values(ckpt.get("artifact_config") or {}, artifact), inputs)
    done, target = int(ckpt.get("iteration", 0)), (ckpt.get("schedule") or {}).get("iterations")
    if changes:
        what = "cannot resume from" if resume else "will not overwrite"
        state = "a finished model" if done >= int(target or 0) else f"a partial training (iteration {done} of {target})"
        raise CheckpointRefused(f"{what} {path}: {state} trained with a different configuration "
                                f"({format_changes(changes)})", kind="changed")
    if target is not None and done >= int(target):
        return "report"
    if not resume:
        raise CheckpointRefused(f"will not overwrite {path}: it holds a partial training (iteration {done} of "
                                f"{target}) of this configuration", kind="partial")
    return "resume"


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def input_hashes(**paths: str | os.PathLike | None) -> dict:
    """``{name: sha256}`` of input files (None for an absent path), for the ``artifact`` settings."""
    from pipeline.artifacts import sha256_file

    return {k: (sha256_file(p) if p is not None and Path(p).is_file() else None) for k, p in paths.items()}
