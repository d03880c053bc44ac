"""PASCAL VOC (VOCdevkit layout): ``ImageSets/Main/<set>.txt`` + ``Annotations/<id>.xml``.

Boxes follow LOST (and detectron2): the 1-based inclusive ``[xmin, ymin, xmax, ymax]`` of the XML
becomes ``[xmin - 1, ymin - 1, xmax, ymax]``. Difficult objects are kept and flagged.
"""
from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.data.errors import DatasetError
from pipeline.data.records import Dataset, ImageRecord

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
_YEARS = {"voc07": "2007", "voc12": "2012"}


def find_voc_dir(root: str | os.PathLike, year: str) -> Path:
    """The ``VOC<year>`` folder: ``root`` may be its parent's parent, ``VOCdevkit/`` or itself."""
    root = Path(root).expanduser()
    candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
    for c in candidates:
        if (c / "Annotations").is_dir() and (c / "ImageSets" / "Main").is_dir():
            return c
    kind = "voc07" if year == "2007" else "voc12"
    looked = "\n  ".join(str(c) for c in candidates)
    raise DatasetError(
        f"no VOC{year} dataset (Annotations/ and ImageSets/Main/) under {root}; looked in:\n  {looked}\n"
        f"Pass root=<the folder holding VOCdevkit/>, or download it (python -m pipeline.data.download {kind} "
        f"--root <dir>)."
    )


def _voc_coco_id(image_id: str, year: str) -> int:
    digits = image_id.replace("_", "")
    if not digits.isdigit():
        raise DatasetError(f"VOC{year} image id {image_id!r} is not numeric (expected e.g. 000005 or 2008_000008)")
    return int(digits)


def _text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"malformed VOC annotation {xml_path}: <{tag}> missing in <{node.tag}>. "
                           f"Re-extract the VOC archive or remove the image from the image set.")
    return child.text.strip()


def parse_voc_xml(xml_path: Path, image_id: str, coco_id: int, image_path: str) -> ImageRecord:
    """One VOC annotation file -> an ImageRecord (width/height from ``<size>`` when present)."""
    if not xml_path.is_file():
        raise DatasetError(f"annotation file missing: {xml_path} (image {image_id!r} is listed in the image "
                           f"set). Re-extract the VOC archive or remove the id from the image set file.")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"malformed VOC annotation {xml_path}: {e}. Re-extract the VOC archive.") from None
    width = height = None
    size = tree.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        try:
            width, height = int(float(_text(size, "width", xml_path))), int(float(_text(size, "height", xml_path)))
        except ValueError:
            raise DatasetError(f"malformed VOC annotation {xml_path}: non-numeric <size>") from None
        if width <= 0 or height <= 0:
            width = height = None  # a few VOC files carry 0x0: the loader measures the image instead
    boxes, classes, difficult = [], [], []
    for obj in tree.findall("object"):
        name = _text(obj, "name", xml_path)
        if name not in VOC_CLASSES:
            raise DatasetError(f"malformed VOC annotation {xml_path}: unknown class {name!r} "
                               f"(expected one of the 20 VOC classes)")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"malformed VOC annotation {xml_path}: <object> without <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bb, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(f"malformed VOC annotation {xml_path}: non-numeric box coordinate") from None
        diff = obj.find("difficult")
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        classes.append(name)
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    return ImageRecord(image_id=image_id, coco_id=coco_id, path=image_path, width=width, height=height,
                       boxes=boxes, classes=classes, difficult=difficult)


def read_image_set(list_path: Path) -> list[str]:
    if not list_path.is_file():
        have = sorted(p.stem for p in list_path.parent.glob("*.txt"))[:12] if list_path.parent.is_dir() else []
        raise DatasetError(f"image list not found: {list_path}. Choose image_set=<one of the files of> "
                           f"{list_path.parent} ({', '.join(have) or 'none'}).")
    ids = [ln.split()[0] for ln in list_path.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"image list {list_path} is empty")
    return ids


def load_voc(kind: str, root: str | os.PathLike, image_set: str = "trainval", name: str | None = None,
             max_images: int | None = None) -> Dataset:
    """VOC2007 (``kind="voc07"``) or VOC2012 (``"voc12"``) ``image_set`` as a Dataset."""
    year = _YEARS[kind]
    voc = find_voc_dir(root, year)
    ids = read_image_set(voc / "ImageSets" / "Main" / f"{image_set}.txt")
    if max_images is not None:
        ids = ids[:max_images]
    records = []
    for image_id in ids:
        path = str(voc / "JPEGImages" / f"{image_id}.jpg")
        records.append(parse_voc_xml(voc / "Annotations" / f"{image_id}.xml", image_id,
                                     _voc_coco_id(image_id, year), path))
    empty = sum(len(r.boxes) == 0 for r in records)
    if empty:
        warnings.warn(f"{kind}: {empty} of {len(records)} images have no annotated object "
                      f"(kept with 0 boxes; CorLoc skips them)", stacklevel=3)
    return Dataset(name=name or kind, records=records, class_names=list(VOC_CLASSES), root=str(voc))
