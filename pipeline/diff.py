"""What changed between two JSON values, as a person reads it (``miner.k_patches: 100 -> 50``).

The one diff helper of the library: the rerun policy (:mod:`pipeline.rerun`) and the mining journal
(:mod:`pipeline.journal`) both name changed settings with it, and neither imports the other."""
from __future__ import annotations

import json
from typing import Any, Sequence


#: a key one side does not record: an artifact leaves out a setting at its default (``Miner.recorded``,
#: ``TrainRecipe.recorded``), so an absent key reads "(default)", never "null"
ABSENT = type("Absent", (), {"__repr__": lambda self: "(default)"})()


def diff_values(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two JSON values (dotted keys); a key only one side
    has shows as ``(default)`` on the other (``miner.solver: (default) -> torch``)."""
    if isinstance(old, dict) and new is ABSENT or old is ABSENT and isinstance(new, dict):
        old, new = (old, {}) if new is ABSENT else ({}, new)
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_values(old.get(k, ABSENT), new.get(k, ABSENT), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    def short(v: Any) -> str:
        return (repr(v) if v is ABSENT else v if isinstance(v, str) else json.dumps(v, default=str))[:60]

    return [f"{prefix.rstrip('.') or '<root>'}: {short(old)} -> {short(new)}"]


def format_changes(changes: Sequence[str], most: int = 6) -> str:
    """At most ``most`` changes on one line, then how many more."""
    more = f"; and {len(changes) - most} more" if len(changes) > most else ""
    return "; ".join(changes[:most]) + more
