"""Fetch and unpack the public datasets (VOC07, VOC12, COCO20k) for users with internet access.

``python -m pipeline.data.download {voc07,voc12,coco20k} --root DIR``. Archives go to
``DIR/downloads/`` (``.part`` while in flight, renamed when complete, skipped when present) and are
unpacked into ``DIR`` (VOC: ``DIR/VOCdevkit/VOC20xx``; COCO20k: ``DIR/train2014``,
``DIR/annotations``, ``DIR/coco20k_filenames.txt``). Reruns are cheap: a marker file records each
finished extraction. Unpacking refuses members that would land outside ``DIR``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

VOC = "http://host.robots.ox.ac.uk/pascal/VOC"
COCO = "http://images.cocodataset.org"
COCO20K_LIST = "https://raw.githubusercontent.com/valeoai/LOST/master/datasets/coco_20k_filenames.txt"

# kind -> [(url, file name under downloads/, unpack?)]; a non-archive is copied to root as ``file name``.
SOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "voc07": [(f"{VOC}/voc2007/VOCtrainval_06-Nov-2007.tar", "VOCtrainval_06-Nov-2007.tar", True),
              (f"{VOC}/voc2007/VOCtest_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar", True)],
    "voc12": [(f"{VOC}/voc2012/VOCtrainval_11-May-2012.tar", "VOCtrainval_11-May-2012.tar", True)],
    "coco20k": [(f"{COCO}/zips/train2014.zip", "train2014.zip", True),
                (f"{COCO}/annotations/annotations_trainval2014.zip", "annotations_trainval2014.zip", True),
                (COCO20K_LIST, "coco20k_filenames.txt", False)],
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched or unpacked; the message says how to do it by hand."""


def download_file(url: str, dest: str | os.PathLike, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``; skip when ``dest`` already exists."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"could not reach {url}: {reason}. Download it yourself and place it at {dest}, "
                            f"then rerun.") from None
    os.replace(part, dest)
    return dest


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def safe_extract(archive: str | os.PathLike, root: str | os.PathLike) -> None:
    """Unpack a tar or zip into ``root``, refusing absolute paths, ``..`` and links leaving ``root``."""
    archive, root = Path(archive), Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                bad = [n for n in z.namelist() if not _inside(root, n)]
                if bad:
                    raise DownloadError(f"refusing to unpack {archive}: member {bad[0]!r} escapes {root}")
                z.extractall(root)
            return
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                escapes = not _inside(root, m.name)
                if m.issym() or m.islnk():
                    link = m.linkname if m.islnk() else os.path.join(os.path.dirname(m.name), m.linkname)
                    escapes = escapes or os.path.isabs(m.linkname) or not _inside(root, link)
                if escapes or m.isdev():
                    raise DownloadError(f"refusing to unpack {archive}: member {m.name!r} escapes {root} "
                                        f"(or is a device)")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(root, members=members, **kwargs)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        reason = " ".join(str(e).split())
        raise DownloadError(f"cannot unpack {archive} ({reason}): delete it and rerun to download it again.") from None


def download_dataset(kind: str, root: str, progress: bool = True) -> None:
    """Download (if needed) and unpack the files of ``kind`` (voc07, voc12, coco20k) under ``root``."""
    if kind not in SOURCES:
        raise ValueError(f"unknown dataset {kind!r} to download: choose one of {', '.join(SOURCES)}")
    root_p = Path(root).expanduser()
    for url, fname, unpack in SOURCES[kind]:
        archive = download_file(url, root_p / "downloads" / fname, progress=progress)
        if not unpack:
            if not (root_p / fname).is_file():
                shutil.copyfile(archive, root_p / fname)
            continue
        marker = root_p / "downloads" / f".{fname}.extracted"
        if marker.is_file():
            continue
        print(f"unpacking {archive} into {root_p}", file=sys.stderr)
        safe_extract(archive, root_p)
        marker.write_text("ok\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.download", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(SOURCES))
    p.add_argument("--root", required=True, help="folder to download into (the dataset's root)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        download_dataset(args.kind, args.root, progress=not args.no_progress)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.kind} ready under {args.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
