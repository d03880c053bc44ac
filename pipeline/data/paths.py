"""Where images are: one resolver for the file names of COCO-style files, one common root of a set.

``resolve_image_path(file_name, root)``: ``file_name`` as is when absolute, else under ``root`` (the
working directory when ``root`` is None). ``common_root(paths)``: the deepest folder holding every
path (what ``info.image_root`` of a pseudo-box file records, so that file names can be relative).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable


def resolve_image_path(file_name: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    """``file_name`` as is when absolute, else under ``image_root`` (or the working directory)."""
    p = Path(file_name)
    return p if p.is_absolute() or image_root is None else Path(image_root) / p


def common_root(paths: Iterable[str | os.PathLike]) -> str:
    """The deepest folder containing every file of ``paths`` (absolute; "" for no path)."""
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    return os.path.commonpath(sorted(dirs)) if dirs else ""


def records_root(records) -> str:
    """:func:`common_root` of the records' image paths (``pipeline.mining.image_root``)."""
    return common_root(r.path for r in records)


def box_file_image_root(coco: dict, *, override: str | os.PathLike | None = None, fallback: Path | None = None,
                        dataset_root: Callable[[], str | os.PathLike]) -> Path:
    """Where a COCO box file's ``file_name``s live: ``override``; else its ``info.image_root`` when that folder
    exists; else, when the data moved since mining (or there is no ``fallback``), ``dataset_root()`` (the
    configured dataset's image root); else ``fallback``."""
    if override:
        return Path(override)
    root = (coco.get("info") or {}).get("image_root")
    if root and Path(root).is_dir():
        return Path(root)
    if root or fallback is None:
        return Path(dataset_root())
    return fallback
