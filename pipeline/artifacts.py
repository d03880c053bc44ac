"""Reading and writing stage files: atomically (temp file + rename), with a manifest.

Formats (see docs/ARCHITECTURE.md, "Artifacts"): ``pseudo_boxes.json`` / ``pseudo_labels.json`` are COCO datasets,
``metrics.json`` a flat-ish dict of numbers, ``manifest.json`` the provenance of a stage dir.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.boxes import xyxy_to_xywh


class ArtifactError(RuntimeError):
    """A stage file is missing or malformed; the message names the file and the fix."""


# --------------------------------------------------------------------------- atomic writes
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``), else by
    the set-and-restore ``os.umask`` dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the umask,
    e.g. 0644), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    try:  # mkstemp creates 0600; give the file the mode open() would (0666 minus the umask)
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete the temporary files :func:`atomic_path` leaves behind when a process is killed mid-write
    (hidden ``.<name>.<random>`` files); returns how many were removed."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    stale = [p for p in d.iterdir() if p.is_file() and p.name.startswith(".")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}" + (f". {hint}" if hint else ""))
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{what} {path} is not valid JSON ({e}). Delete it and rerun the stage that writes it.") from e


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


# --------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of ``obj`` serialised as sorted-key JSON (``str()`` for what JSON lacks): a content key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- COCO artifacts
def coco_boxes_dataset(
    images: Iterable[dict],
    annotations: Iterable[dict],
    categories: list[dict] | None = None,
    info: dict | None = None,
) -> dict:
    """Assemble a COCO dataset dict.

    ``images``: dicts with ``id`` (int), ``file_name``, ``width``, ``height`` (+ any extra keys,
    e.g. ``image_id`` the dataset's string id). ``annotations``: dicts with ``image_id`` (int),
    ``bbox_xyxy`` (converted here to COCO ``bbox`` xywh), ``category_id`` (default 1) and any extra
    keys (``score``, ``seed``...). Annotation ids are assigned 1..n in order.
    """
    anns = []
    for i, a in enumerate(annotations, start=1):
        a = dict(a)
        xyxy = a.pop("bbox_xyxy")
        x, y, w, h = (float(v) for v in xyxy_to_xywh([xyxy])[0])
        a.setdefault("category_id", 1)
        anns.append({"id": i, "image_id": int(a.pop("image_id")), "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 0, **a})
    return {
        "info": info or {},
        "images": list(images),
        "annotations": anns,
        "categories": categories or [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def read_coco_boxes(path: str | os.PathLike, what: str = "pseudo-box file", hint: str = "") -> dict:
    """Read and validate a COCO dataset json (images/annotations/categories)."""
    data = read_json(path, what, hint)
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ArtifactError(f"{what} {path} is not a COCO dataset (needs 'images' and 'annotations' lists).")
    for a in data["annotations"]:
        if "bbox" not in a or "image_id" not in a or len(a["bbox"]) != 4:
            raise ArtifactError(f"{what} {path}: annotation {a.get('id')} lacks a 4-number 'bbox' or 'image_id'.")
    data.setdefault("categories", [{"id": 1, "name": "object"}])
    return data


# --------------------------------------------------------------------------- manifest
def git_revision(cwd: str | os.PathLike | None = None) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Iterable[str] = ("torch", "torchvision", "numpy", "scipy", "faiss-cpu",
                                              "pycocotools", "hydra-core", "scikit-image", "pillow")) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def write_manifest(
    stage_dir: str | os.PathLike,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str | os.PathLike] | None = None,
    weights_sha256: str | None = None,
    start_time: float,
    end_time: float,
    extra: dict | None = None,
) -> Path:
    """Write ``manifest.json``: config, versions, git revision, input hashes, host, times."""
    inputs = inputs or {}
    hashes = {}
    for key, p in inputs.items():
        p = Path(p)
        hashes[key] = {"path": str(p), "sha256": sha256_file(p) if p.is_file() else None}
    iso = lambda t: _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat()  # noqa: E731
    manifest = {
        "stage": stage,
        "config": config,
        "versions": package_versions(),
        "git_revision": git_revision(Path(__file__).resolve().parent),
        "inputs": hashes,
        "weights_sha256": weights_sha256,
        "host": socket.gethostname(),
        "start_time": iso(start_time),
        "end_time": iso(end_time),
        "wall_time_s": round(end_time - start_time, 3),
        **(extra or {}),
    }
    return write_json(Path(stage_dir) / "manifest.json", manifest)


# --------------------------------------------------------------------------- replacing finished results
def replacement_dir(final: str | os.PathLike) -> Path:
    """Where a forced rerun writes its results beside the finished ones in ``final`` (a hidden sibling)."""
    final = Path(final)
    return final.parent / f".{final.name}.new"


def _retired_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def recover_replacement(final: str | os.PathLike) -> None:
    """Undo a swap killed between its two renames: the finished results, parked in the retired folder, go
    back to ``final`` (or, when the new ones already took their place, the retired copy is removed)."""
    import shutil

    final = Path(final)
    old = _retired_dir(final)
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def begin_replacement(final: str | os.PathLike, *, keep: bool) -> Path:
    """Start writing new results for ``final`` in :func:`replacement_dir`, leaving ``final`` whole until
    :func:`commit_replacement`: a forced rerun that fails or is killed loses nothing. ``keep``: continue what
    an earlier, killed replacement wrote there (its journal or checkpoint decides whether it fits); else it
    starts empty."""
    import shutil

    recover_replacement(final)
    work = replacement_dir(final)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def commit_replacement(final: str | os.PathLike, work: str | os.PathLike) -> Path:
    """Swap the complete new results in ``work`` into ``final``: ``final`` is parked, ``work`` renamed onto
    it, the parked results removed. Each step is a rename, and :func:`recover_replacement` (called by every
    :func:`begin_replacement`) repairs a swap killed half-way, so ``final`` is never left without results."""
    import shutil

    final, work = Path(final), Path(work)
    old = _retired_dir(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
