"""What changed between two JSON values, as a person reads it (``miner.k_patches: 100 -> 50``).

The one diff helper of the library: the rerun policy (:mod:`pipeline.rerun`) and the mining journal
(:mod:`pipeline.journal`) both name changed settings with it, and neither imports the other."""
from __future__ import annotations

import json
from typing import Any, Sequence


def diff_values(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two JSON values (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_values(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    short = lambda v: (json.dumps(v, default=str) if not isinstance(v, str) else v)[:60]  # noqa: E731
    return [f"{prefix.rstrip('.') or '<root>'}: {short(old)} -> {short(new)}"]


def format_changes(changes: Sequence[str], most: int = 6) -> str:
    """At most ``most`` changes on one line, then how many more."""
    more = f"; and {len(changes) - most} more" if len(changes) > most else ""
    return "; ".join(changes[:most]) + more
