"""COCO instances json (any split) and COCO20k (train2014 restricted to the LOST image list).

Boxes: COCO ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (no rounding here: CorLoc rounds as LOST
does). ``iscrowd`` becomes the ``crowd`` flag; crowd boxes are kept in the record.

Difficult objects (VOC's ``<difficult>1</difficult>``) in a COCO json: give the annotation
``"difficult": 1`` (or ``"ignore": 1``); it becomes the record's ``difficult`` flag, exactly like a
VOC XML's. Files that mark them ``"iscrowd": 1`` instead (as ``build_coco_gt(voc_difficult="ignore")``
writes, and some converters do) load them as crowd; evaluations can treat crowd as difficult
(``apply_difficult(records, mode, crowd_is_difficult=True)``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from pipeline.boxes import xywh_to_xyxy
from pipeline.data.errors import DatasetError
from pipeline.data.records import Dataset, ImageRecord


def is_difficult(ann: dict) -> bool:
    """A COCO annotation marks a VOC-style difficult object with ``"difficult": 1`` (VOC's own tag, as
    detectron2's VOC->COCO converters write it) or ``"ignore": 1``; ``iscrowd`` is kept apart (a crowd
    region), see :func:`pipeline.evaluation.voc_ap.apply_difficult` to treat it as difficult."""
    return bool(ann.get("difficult", 0) or ann.get("ignore", 0))


def _read_instances(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DatasetError(f"COCO annotation file not found: {ann_file}. Pass ann_file=... or root=..., or "
                           f"download it (python -m pipeline.data.download).")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"COCO annotation file {ann_file} is not valid JSON ({e}); download it again.") from None
    if not isinstance(data, dict) or not data.get("images"):
        raise DatasetError(f"COCO annotation file {ann_file} has no 'images': not a COCO instances file?")
    return data


def _records(data: dict, ann_file: Path, image_paths: dict[int, str], ids: list[int]) -> tuple[list, list]:
    """Records for ``ids`` (in that order) and the category names ordered by category id."""
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    cat_name = {c["id"]: c["name"] for c in cats}
    images = {im["id"]: im for im in data["images"]}
    per_image: dict[int, list[dict]] = {i: [] for i in ids}
    for a in data.get("annotations", []):
        if a.get("image_id") in per_image:
            per_image[a["image_id"]].append(a)
    records = []
    for i in ids:
        anns = per_image[i]
        for a in anns:
            missing = [k for k in ("bbox", "category_id") if k not in a]
            if missing:
                raise DatasetError(f"malformed COCO annotation in {ann_file}: annotation {a.get('id', '?')} of "
                                   f"image {i} has no {' / '.join(missing)}")
            if a["category_id"] not in cat_name:
                known = sorted(cat_name)
                shown = f"{known[:10]}{' ...' if len(known) > 10 else ''}" if known else "none"
                raise DatasetError(f"{ann_file}: category_id {a['category_id']} of annotation {a.get('id', '?')} "
                                   f"(image {i}) is not in the file's categories (ids {shown}): add the "
                                   "category to 'categories' or fix the annotation.")
        classes = [cat_name[a["category_id"]] for a in anns]
        boxes = xywh_to_xyxy([a["bbox"] for a in anns]) if anns else None
        im = images[i]
        records.append(ImageRecord(
            image_id=str(i), coco_id=int(i), path=image_paths[i], width=im.get("width"), height=im.get("height"),
            boxes=boxes if boxes is not None else [], classes=classes,
            difficult=[is_difficult(a) for a in anns], crowd=[bool(a.get("iscrowd", 0)) for a in anns],
            segmentations=[a.get("segmentation") or None for a in anns] if any("segmentation" in a for a in anns)
            else []))
    empty = sum(len(r.boxes) == 0 for r in records)
    if empty:
        warnings.warn(f"{ann_file.name}: {empty} of {len(records)} images have no annotation "
                      f"(kept with 0 boxes; CorLoc skips them)", stacklevel=4)
    return records, [c["name"] for c in cats]


def find_coco_files(root: str | os.PathLike, image_set: str, ann_file: str | None,
                    image_dir: str | None) -> tuple[Path, Path]:
    """Resolve (ann_file, image_dir); when not given: ``root/annotations/instances_<split>.json``, ``root/<split>/``."""
    root = Path(root).expanduser()
    if ann_file is None:
        wanted = root / "annotations" / f"instances_{image_set}.json"
        found = sorted((root / "annotations").glob("instances_*.json"))
        if wanted.is_file():
            ann = wanted
        elif len(found) == 1:
            ann = found[0]
        else:
            have = f" (found {', '.join(p.name for p in found)}: pass image_set=<one split>)" if found else ""
            raise DatasetError(f"no COCO annotation file {wanted}{have}. Pass ann_file=... and image_dir=..., "
                               f"or root=...")
    else:
        ann = Path(ann_file).expanduser()
    if image_dir is None:
        split = ann.stem.removeprefix("instances_")
        cands = list(dict.fromkeys([root / split, root / "images" / split, ann.parent.parent / split]))
        img = next((c for c in cands if c.is_dir()), None)
        if img is None:
            raise DatasetError(f"no image folder for {ann.name}; looked in: {', '.join(map(str, cands))}. "
                               f"Pass image_dir=...")
    else:
        img = Path(image_dir).expanduser()
        if not img.is_dir():
            raise DatasetError(f"image folder not found: {img}. Pass image_dir=...")
    return ann, img


def load_coco(root: str | os.PathLike, image_set: str = "val2017", ann_file: str | None = None,
              image_dir: str | None = None, name: str | None = None, max_images: int | None = None) -> Dataset:
    """A COCO instances json + its images, ordered by image id (as torchvision's CocoDetection)."""
    ann, img = find_coco_files(root, image_set, ann_file, image_dir)
    data = _read_instances(ann)
    ids = sorted(im["id"] for im in data["images"])
    if max_images is not None:
        ids = ids[:max_images]
    paths = {im["id"]: str(img / im["file_name"]) for im in data["images"]}
    records, classes = _records(data, ann, paths, ids)
    return Dataset(name=name or "coco", records=records, class_names=classes, root=str(img))


def read_coco20k_list(list_file: Path) -> list[tuple[int, str]]:
    """``(image id, file name)`` per line of the COCO20k list (``train2014/COCO_train2014_<id>.jpg``)."""
    if not list_file.is_file():
        raise DatasetError(f"COCO20k image list not found: {list_file}. Download it (python -m "
                           f"pipeline.data.download coco20k --root <dir>) or pass list_file=...")
    out = []
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        base = line.rsplit("/", 1)[-1]
        try:
            out.append((int(base.rsplit(".", 1)[0].rsplit("_", 1)[-1]), base))
        except ValueError:
            raise DatasetError(f"{list_file}:{n}: cannot read an image id from {line!r} "
                               f"(expected train2014/COCO_train2014_XXXXXXXXXXXX.jpg)") from None
    if not out:
        raise DatasetError(f"COCO20k image list {list_file} is empty")
    return out


def load_coco20k(root: str | os.PathLike, ann_file: str | None = None, image_dir: str | None = None,
                 list_file: str | None = None, name: str | None = None, max_images: int | None = None) -> Dataset:
    """COCO train2014 restricted to the COCO20k list, in the list's order."""
    root = Path(root).expanduser()
    lst = Path(list_file).expanduser() if list_file else root / "coco20k_filenames.txt"
    entries = read_coco20k_list(lst)
    ann = Path(ann_file).expanduser() if ann_file else root / "annotations" / "instances_train2014.json"
    img = Path(image_dir).expanduser() if image_dir else root / "train2014"
    if not img.is_dir():
        raise DatasetError(f"COCO20k image folder not found: {img}. Pass image_dir=..., or download it (python -m "
                           f"pipeline.data.download coco20k --root <dir>).")
    data = _read_instances(ann)
    known = {im["id"] for im in data["images"]}
    missing = [base for i, base in entries if i not in known]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(entries)} images of {lst} are not in {ann} (first: "
                           f"{missing[0]}): use the train2014 instances file.")
    if max_images is not None:
        entries = entries[:max_images]
    paths = {i: str(img / base) for i, base in entries}
    records, classes = _records(data, ann, paths, [i for i, _ in entries])
    return Dataset(name=name or "coco20k", records=records, class_names=classes, root=str(img))
