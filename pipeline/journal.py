"""Append-only JSON-lines journals: per-item results written as they are computed.

A journal survives a crash losing at most the line being written: every line is flushed and fsync'ed,
and a truncated last line (the process died mid-write) is cut off when the journal is reopened. A
sidecar ``<name>.meta.json`` records what produced the journal; reopening it with a different meta
raises :class:`JournalMismatch` instead of silently mixing results of two configurations.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from pipeline.artifacts import read_json, write_json


class JournalMismatch(RuntimeError):
    pass


def canonical_json(obj: Any) -> Any:
    """``obj`` as it reads back from a sorted-key JSON file (dict order, tuples -> lists, str() of the rest)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def meta_path_of(path: str | os.PathLike) -> Path:
    """The sidecar ``<journal>.meta.json`` describing what produced the journal at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


class Journal:
    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], key: str = "index") -> None:
        self.path = Path(path)
        self.meta_path = meta_path_of(self.path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = canonical_json(meta)
        if self.meta_path.exists() and self.path.exists():
            old = read_json(self.meta_path, "journal meta")
            if old != meta:
                from pipeline.diff import diff_values, format_changes

                raise JournalMismatch(
                    f"{self.path} holds partial results of a different configuration (changed: "
                    f"{format_changes(diff_values(old, meta))}). Force the rerun to start again, "
                    "or restore the previous settings to resume."
                )
        else:
            write_json(self.meta_path, meta)
        self._repair()

    def _repair(self) -> None:
        """Cut a partially written last line (a crash mid-write) so appends start on a clean line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)

    def __iter__(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # only a torn last line can be bad; _repair cuts it
                    continue

    def load(self) -> dict[Any, dict]:
        return {row[self.key]: row for row in self}

    def append(self, row: dict) -> None:
        line = json.dumps(row, sort_keys=True, default=str) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())



def discard_journal(path: str | os.PathLike) -> None:
    """Delete a journal and its meta (``force`` reruns)."""
    for p in (Path(path), meta_path_of(path)):
        p.unlink(missing_ok=True)
