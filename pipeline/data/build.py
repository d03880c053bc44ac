"""``build_dataset``: one entry point for every dataset kind."""
from __future__ import annotations

from pipeline.data.coco import load_coco, load_coco20k
from pipeline.data.errors import DatasetError
from pipeline.data.folder import load_demo, load_folder
from pipeline.data.records import Dataset
from pipeline.data.voc import load_voc

KINDS = ("voc07", "voc12", "coco", "coco20k", "folder", "demo")


def build_dataset(kind: str, root: str, *, image_set: str = "trainval", ann_file: str | None = None,
                  image_dir: str | None = None, list_file: str | None = None, name: str | None = None,
                  max_images: int | None = None) -> Dataset:
    """Build the records of a dataset.

    kind: ``voc07``/``voc12`` (``root`` holds ``VOCdevkit/``, or is ``VOCdevkit/`` or ``VOC20xx/``;
    ``image_set`` names ``ImageSets/Main/<image_set>.txt``), ``coco`` (``ann_file`` + ``image_dir``, or
    ``root/annotations/instances_<image_set>.json`` + ``root/<split>/``), ``coco20k`` (``root`` holds
    ``train2014/``, ``annotations/instances_train2014.json``, ``coco20k_filenames.txt``), ``folder``
    (every image under ``root``, no GT) or ``demo`` (``root`` ignored). ``name`` defaults to ``kind``;
    ``max_images`` keeps the first n records in the set's order.
    """
    if max_images is not None:
        if isinstance(max_images, bool) or int(max_images) != max_images or max_images < 1:
            raise DatasetError(f"max_images must be a positive integer or null, got {max_images!r}")
        max_images = int(max_images)
    if kind in ("voc07", "voc12"):
        return load_voc(kind, root, image_set=image_set, name=name, max_images=max_images)
    if kind == "coco":
        return load_coco(root, image_set=image_set, ann_file=ann_file, image_dir=image_dir, name=name,
                         max_images=max_images)
    if kind == "coco20k":
        return load_coco20k(root, ann_file=ann_file, image_dir=image_dir, list_file=list_file, name=name,
                            max_images=max_images)
    if kind == "folder":
        return load_folder(root, name=name, max_images=max_images)
    if kind == "demo":
        return load_demo(name=name, max_images=max_images)
    raise DatasetError(f"unknown dataset kind {kind!r}: choose one of {', '.join(KINDS)}")
