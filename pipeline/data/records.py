"""The one record type every dataset produces: an image and, when known, its ground truth.

Box convention used everywhere in the library: ``xyxy`` float pixels in the original image,
``x2``/``y2`` exclusive (continuous coordinates: a box covering the whole W x H image is
``[0, 0, W, H]``). VOC's 1-based inclusive annotations become ``[xmin - 1, ymin - 1, xmax, ymax]``.
COCO's ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float64)


def _empty_flags() -> np.ndarray:
    return np.zeros((0,), dtype=bool)


@dataclass
class ImageRecord:
    """One image of a dataset.

    ``image_id`` is the dataset's own string id (VOC ``"000005"``, COCO ``"139"``, a folder's
    relative path); ``coco_id`` is the integer id used in COCO-format artifacts.
    ``width``/``height`` come from the annotation when it has them (None otherwise: the loader
    reads them from the decoded image). ``has_gt`` is False for unlabelled folders. ``segmentations``: each
    GT object's COCO segmentation (polygons or RLE, None for an object without one), empty when the
    dataset has no masks (VOC, folders).
    """

    image_id: str
    coco_id: int
    path: str
    width: int | None = None
    height: int | None = None
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    classes: list[str] = field(default_factory=list)
    difficult: np.ndarray = field(default_factory=_empty_flags)
    crowd: np.ndarray = field(default_factory=_empty_flags)
    has_gt: bool = True
    segmentations: list = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(s is not None for s in self.segmentations)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        n = len(self.boxes)
        self.difficult = np.zeros(n, bool) if len(self.difficult) == 0 and n else np.asarray(self.difficult, bool)
        self.crowd = np.zeros(n, bool) if len(self.crowd) == 0 and n else np.asarray(self.crowd, bool)
        if not (len(self.classes) == len(self.difficult) == len(self.crowd) == n):
            raise ValueError(
                f"image {self.image_id!r}: {n} boxes but {len(self.classes)} classes, "
                f"{len(self.difficult)} difficult flags and {len(self.crowd)} crowd flags"
            )
        if self.segmentations and len(self.segmentations) != n:
            raise ValueError(f"image {self.image_id!r}: {n} boxes but {len(self.segmentations)} segmentations")


@dataclass
class Dataset:
    """A named list of records plus the class vocabulary of its ground truth (may be empty)."""

    name: str
    records: list[ImageRecord]
    class_names: list[str] = field(default_factory=list)
    root: str = ""
    skipped_hidden: int = 0  # image folders: hidden image files (names/folders starting with ".") left out
    #: image folders: files left out because they are no image of a supported kind, by suffix ({".gif": 2})
    skipped_unsupported: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_gt(self) -> bool:
        return any(r.has_gt for r in self.records)

    @property
    def has_masks(self) -> bool:
        """Some GT object has a mask (COCO instances; VOC and folders have none)."""
        return any(r.has_masks for r in self.records)

    def skipped_notes(self) -> list[str]:
        """What the user should hear about files of an image folder that were left out (one line each)."""
        from pipeline.data.folder import IMAGE_EXTENSIONS

        notes = [f"{self.name}: skipped {self.skipped_hidden} hidden file(s) (names or folders starting with '.', "
                 "e.g. the ._ files macOS leaves on shared drives)"] if self.skipped_hidden else []
        if self.skipped_unsupported:
            kinds = ", ".join(f"{n} {suffix}" for suffix, n in self.skipped_unsupported.items())
            notes.append(f"{self.name}: skipped {sum(self.skipped_unsupported.values())} file(s) that are not images "
                         f"of a supported kind ({kinds}); supported: {' '.join(IMAGE_EXTENSIONS)} (convert the others "
                         "to PNG or JPEG to mine them)")
        return notes
