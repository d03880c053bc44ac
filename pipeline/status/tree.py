"""Paths of a checked tree: inputs a manifest recorded inside the tree it ran in are looked up in the tree
being checked (a copied ``outputs/`` is checked against its own files), and paths as messages show them.

A manifest records each input by the path it had when the stage ran, and records where its tree was (the
resolved config's ``stage_dir``, ``base_dir`` and ``paths.output_root``). Manifests are read as written:
absolute or relative paths, nothing to migrate."""
from __future__ import annotations

import os
from pathlib import Path, PurePath


def lexical_relative(path: str | os.PathLike, base: str | os.PathLike) -> PurePath | None:
    """``path`` relative to ``base`` when it lies inside it (compared as written; a relative and an absolute
    one through the current directory), else None."""
    p, b = os.path.normpath(path), os.path.normpath(base)
    if os.path.isabs(p) != os.path.isabs(b):
        p, b = os.path.abspath(p), os.path.abspath(b)
    try:
        return PurePath(p).relative_to(b)
    except ValueError:
        return None


def tree_map(config: dict, stage_dir: Path) -> list[tuple[str, Path]]:
    """(a directory of the tree the stage ran in, the same directory in the tree being checked), the stage's
    own dir first: the manifest's config recorded ``stage_dir``, ``base_dir`` and ``paths.output_root``, and
    ``stage_dir`` is where that manifest is now. A recorded dir is mapped only when the layout below it is
    the same here (a stage written elsewhere with ``stage_dir=...`` maps only its own dir)."""
    recorded_stage = config.get("stage_dir")
    if not isinstance(recorded_stage, str) or not recorded_stage:
        return []
    here = Path(os.path.abspath(stage_dir))
    pairs = [(recorded_stage, here)]
    for recorded in (config.get("base_dir"), (config.get("paths") or {}).get("output_root")):
        if not isinstance(recorded, str) or not recorded:
            continue
        rel = lexical_relative(recorded_stage, recorded)
        n = len(rel.parts) if rel is not None else 0
        if rel is None or len(here.parts) <= n or tuple(here.parts[len(here.parts) - n:]) != rel.parts:
            continue
        pairs.append((recorded, here.parents[n - 1] if n else here))
    return pairs


def reroot(recorded: str, tree: list[tuple[str, Path]]) -> Path:
    """Where a recorded input is in the tree being checked (see :func:`tree_map`); an input outside the
    recorded tree stays as recorded."""
    for old, new in tree:
        rel = lexical_relative(recorded, old)
        if rel is not None:
            return new / rel
    return Path(recorded)


def shown(path: Path, root: Path | None) -> str:
    """A path as a message shows it: relative to the base dir when inside it (``mine/pseudo_boxes.json``)."""
    if root is not None:
        rel = lexical_relative(path, root)
        if rel is not None:
            return rel.as_posix()
    return str(path)


def inside(path: Path, directory: Path) -> bool:
    return lexical_relative(os.path.abspath(path), os.path.abspath(directory)) is not None


def visible(path: Path, root: Path) -> bool:
    """Not under a hidden dir (``.cag.new``: a forced rerun's work in progress, ``.report.tmp-*``)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts
    return not any(part.startswith(".") for part in parts)
