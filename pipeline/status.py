"""Which stages of a dataset/backbone are done, stale (an input changed since) or missing.

A stage dir is *done* when its ``manifest.json`` exists and every input the manifest recorded still has
the recorded sha256; *stale* when an input changed or vanished; *missing* without a manifest.
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
    state: str                       # done | stale | missing
    path: Path
    changed: list[str] = field(default_factory=list)
    wall_time_s: float | None = None
    end_time: str | None = None


def stage_state(stage_dir: str | os.PathLike, stage: str | None = None) -> StageState:
    stage_dir = Path(stage_dir)
    name = stage or stage_dir.name
    man_path = stage_dir / "manifest.json"
    if not man_path.is_file():
        return StageState(name, "missing", stage_dir)
    try:
        man = json.loads(man_path.read_text())
    except json.JSONDecodeError:
        return StageState(name, "stale", stage_dir, ["manifest.json (unreadable)"])
    changed = []
    for key, rec in (man.get("inputs") or {}).items():
        p = Path(rec.get("path", ""))
        if not p.is_file() or (rec.get("sha256") and sha256_file(p) != rec["sha256"]):
            changed.append(f"{key} ({p})")
    return StageState(name, "stale" if changed else "done", stage_dir, changed, man.get("wall_time_s"),
                      man.get("end_time"))


def pipeline_status(root: str | os.PathLike, stages=STAGES) -> list[StageState]:
    """States of every stage run under ``root`` (= output_root/dataset/backbone): ``root/<stage>`` and its
    variants (``mine_dinoseg``), and nested runs (``cluster/lost/k20``) reported one per manifest."""
    root = Path(root)
    out = []
    for s in stages:
        dirs = [root / s] + sorted(p for p in root.glob(f"{s}_*") if p.is_dir())
        for d in dirs:
            nested = sorted(m.parent for m in d.rglob("manifest.json") if m.parent != d) if d.is_dir() else []
            if (d / "manifest.json").is_file() or not nested:
                if d.exists() or d == root / s:
                    out.append(stage_state(d, d.name))
            out.extend(stage_state(n, str(n.relative_to(root))) for n in nested)
    return out


def format_status(states: list[StageState]) -> str:
    lines = []
    for st in states:
        mark = {"done": "done   ", "stale": "STALE  ", "missing": "missing"}[st.state]
        extra = ""
        if st.state == "done" and st.end_time:
            extra = f"  finished {st.end_time[:19]}Z in {st.wall_time_s:.0f} s" if st.wall_time_s is not None else ""
        if st.changed:
            extra = "  inputs changed: " + ", ".join(st.changed)
        lines.append(f"{st.stage:<16} {mark} {st.path}{extra}")
    return "\n".join(lines)
