"""Unlabelled image folders, and the demo set (scikit-image's bundled photos + boxes drawn for them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.errors import DatasetError
from pipeline.data.records import Dataset, ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEMO_IMAGES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]
DEMO_GT = Path(__file__).with_name("demo_gt.json")


def is_hidden(rel: str | os.PathLike) -> bool:
    """True when a component of the relative path ``rel`` starts with a dot (``.git/``, macOS ``._x.jpg``)."""
    return any(part.startswith(".") for part in Path(rel).parts if part not in (".", ".."))


def load_folder(root: str | os.PathLike, name: str | None = None, max_images: int | None = None) -> Dataset:
    """Every image file under ``root`` (recursive, sorted by relative path); no ground truth.

    Hidden files and folders (a name starting with ``.``, e.g. the ``._IMG_1.JPG`` resource forks macOS
    leaves on USB disks, or ``.thumbnails/``) are skipped and counted in ``Dataset.skipped_hidden``; other files
    that are no image of a supported kind (a GIF, a text file) in ``Dataset.skipped_unsupported``."""
    root = Path(root).expanduser()
    if root.is_file():
        raise DatasetError(f"{root} is a file, not a folder of images: give the folder that holds it "
                           f"({root.parent}).")
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}. Pass root=<a folder of images>.")
    files, hidden, unsupported = [], 0, {}
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        if is_hidden(p.relative_to(root)):
            hidden += p.suffix.lower() in IMAGE_EXTENSIONS
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        else:  # said, not silently dropped (a GIF, a HEIC...): the stage prints the count per suffix
            unsupported[p.suffix.lower() or "(none)"] = unsupported.get(p.suffix.lower() or "(none)", 0) + 1
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        also = f" ({hidden} hidden image files skipped: names or folders starting with '.')" if hidden else ""
        raise DatasetError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) under {root}{also}. Pass root=<a folder of images>.")
    if max_images is not None:
        files = files[:max_images]
    records = [ImageRecord(image_id=p.relative_to(root).as_posix(), coco_id=i, path=str(p), has_gt=False)
               for i, p in enumerate(files, start=1)]
    return Dataset(name=name or "folder", records=records, class_names=[], root=str(root), skipped_hidden=hidden,
                   skipped_unsupported=dict(sorted(unsupported.items())))


def load_demo(name: str | None = None, max_images: int | None = None) -> Dataset:
    """The six natural photos installed with scikit-image, one hand-drawn box each (``demo_gt.json``)."""
    import skimage

    data_dir = Path(skimage.data_dir)
    try:
        gt = json.loads(DEMO_GT.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"demo ground truth {DEMO_GT} unreadable ({e}): reinstall the package") from None
    records = []
    for i, fname in enumerate(DEMO_IMAGES[:max_images], start=1):
        path = data_dir / fname
        if not path.is_file():
            raise DatasetError(f"demo image missing: {path}. Reinstall scikit-image (pip install scikit-image).")
        g = gt[fname]
        records.append(ImageRecord(image_id=Path(fname).stem, coco_id=i, path=str(path), width=g["width"],
                                   height=g["height"], boxes=[o["box"] for o in g["objects"]],
                                   classes=[o["class"] for o in g["objects"]]))
    classes = sorted({c for r in records for c in r.classes})
    return Dataset(name=name or "demo", records=records, class_names=classes, root=str(data_dir))
