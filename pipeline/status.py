"""Which stages of a dataset/backbone are done, partial, stale (an input changed since) or missing.

A stage dir is *done* when its ``manifest.json`` exists and every input the manifest recorded still has
the recorded sha256 (and, when given, the dataset's annotations still have the recorded digest); *stale*
when an input or the annotations changed, or when a stage it read from is itself stale or partial (the
staleness propagates downstream: cad is stale when its clusters are); *partial* when a mining run has
journalled some images but not merged them yet (``partial N/M``); *missing* otherwise.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import sha256_file

STAGES = ("mine", "cag", "cluster", "cad")


@dataclass
class StageState:
    stage: str
    state: str                       # done | partial | stale | missing
    path: Path
    changed: list[str] = field(default_factory=list)
    wall_time_s: float | None = None
    end_time: str | None = None
    progress: tuple[int, int] | None = None   # (images done, images in the run) of a partial mining run
    inputs: list[Path] = field(default_factory=list)


def _journal_progress(stage_dir: Path) -> tuple[int, int | None] | None:
    """(distinct images with a successful row, images of the run when known) of a mining run's journals."""
    results = stage_dir / "results"
    journals = sorted(results.glob("shard-*.jsonl")) if results.is_dir() else []
    if not journals:
        return None
    done: set = set()
    for j in journals:
        with open(j) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("error") is None:
                    done.add(row.get("image_id", row.get("index")))
    return len(done), None


def stage_state(stage_dir: str | os.PathLike, stage: str | None = None, *, annotations_digest: str | None = None,
                n_images: int | None = None) -> StageState:
    """The state of one stage dir. ``annotations_digest``: the current digest of the dataset's annotations
    (:func:`annotations_digest`), compared with the one the manifest recorded (if it recorded one);
    ``n_images``: the dataset's image count (a mining run with fewer images done is partial)."""
    stage_dir = Path(stage_dir)
    name = stage or stage_dir.name
    man_path = stage_dir / "manifest.json"
    progress = _journal_progress(stage_dir)
    if not man_path.is_file():
        if progress is not None:
            return StageState(name, "partial", stage_dir, progress=(progress[0], n_images or 0))
        return StageState(name, "missing", stage_dir)
    try:
        man = json.loads(man_path.read_text())
    except json.JSONDecodeError:
        return StageState(name, "stale", stage_dir, ["manifest.json (unreadable)"])
    changed, inputs = [], []
    for key, rec in (man.get("inputs") or {}).items():
        p = Path(rec.get("path", ""))
        inputs.append(p)
        if not p.is_file() or (rec.get("sha256") and sha256_file(p) != rec["sha256"]):
            changed.append(f"{key} ({p})")
    recorded = man.get("annotations_digest")
    if annotations_digest and recorded and recorded != annotations_digest:
        changed.append("the dataset's annotations")
    if progress is not None and n_images and progress[0] < n_images and not changed:
        return StageState(name, "partial", stage_dir, progress=(progress[0], n_images), inputs=inputs)
    return StageState(name, "stale" if changed else "done", stage_dir, changed, man.get("wall_time_s"),
                      man.get("end_time"), inputs=inputs)


def pipeline_status(root: str | os.PathLike, stages=STAGES, *, annotations_digest: str | None = None,
                    n_images: int | None = None) -> list[StageState]:
    """States of every stage run under ``root`` (= output_root/dataset/backbone): ``root/<stage>`` and its
    variants (``mine_dinoseg``), and nested runs (``cluster/lost/k20``) reported one per manifest; a stage
    that read a file of a stale or partial stage is stale too."""
    root = Path(root)
    kw = {"annotations_digest": annotations_digest, "n_images": n_images}
    out = []
    for s in stages:
        dirs = [root / s] + sorted(p for p in root.glob(f"{s}_*") if p.is_dir())
        for d in dirs:
            nested = sorted(m.parent for m in d.rglob("manifest.json") if m.parent != d) if d.is_dir() else []
            if (d / "manifest.json").is_file() or not nested:
                if d.exists() or d == root / s:
                    out.append(stage_state(d, d.name, **kw))
            out.extend(stage_state(n, str(n.relative_to(root)), **kw) for n in nested)
    _propagate(out)
    return out


def _propagate(states: list[StageState]) -> None:
    """Mark stale every stage that read a file inside a stale or partial stage's dir (to a fixed point)."""
    changed = True
    while changed:
        changed = False
        bad = [s for s in states if s.state in ("stale", "partial")]
        for st in states:
            if st.state != "done":
                continue
            for b in bad:
                if any(_inside(p, b.path) for p in st.inputs):
                    st.state = "stale"
                    st.changed.append(f"upstream {b.stage} is {b.state}")
                    changed = True
                    break


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(directory))
        return True
    except ValueError:
        return False


def annotations_digest(records) -> str:
    """A digest of what a dataset's annotations say (ids, boxes, classes, difficult and crowd flags): a stage
    that scored against them is stale when it changes."""
    import numpy as np

    from pipeline.artifacts import sha256_json

    return sha256_json([[r.image_id, int(r.coco_id), np.asarray(r.boxes).round(3).tolist(), list(r.classes),
                         np.asarray(r.difficult).tolist(), np.asarray(r.crowd).tolist()]
                        for r in records if r.has_gt])


def format_status(states: list[StageState]) -> str:
    lines = []
    for st in states:
        mark = {"done": "done   ", "stale": "STALE  ", "missing": "missing", "partial": "partial"}[st.state]
        extra = ""
        if st.state == "done" and st.end_time:
            extra = f"  finished {st.end_time[:19]}Z in {st.wall_time_s:.0f} s" if st.wall_time_s is not None else ""
        if st.state == "partial" and st.progress:
            done, total = st.progress
            extra = f"  {done}/{total} images mined" if total else f"  {done} images mined, not merged"
        if st.changed:
            extra = "  changed: " + ", ".join(st.changed)
        lines.append(f"{st.stage:<16} {mark} {st.path}{extra}")
    return "\n".join(lines)
