"""The images of a COCO box file (pseudo-boxes, pseudo-labels) as :class:`ImageRecord` s, for running and
scoring a detector on the images it was trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.paths import resolve_image_path
from pipeline.data.records import ImageRecord


def training_set_records(coco: dict, root: str | Path, gt_records: Sequence[ImageRecord] = ()) -> tuple[list, int, int]:
    """ImageRecords of ``coco``'s images that exist on disk (``file_name`` under ``root``), with the ground
    truth of the record of ``gt_records`` that has the same coco_id and path; (records, images missing on
    disk, images left out because mining failed on them: ``mining_error``, unreadable or smaller than a patch;
    no detector runs on them)."""
    gt = {int(r.coco_id): r for r in gt_records if r.has_gt}
    out, missing, failed = [], 0, 0
    for im in coco["images"]:
        if im.get("mining_error"):
            failed += 1
            continue
        p = resolve_image_path(str(im["file_name"]), Path(root))
        if not p.is_file():
            missing += 1
            continue
        r = gt.get(int(im["id"]))
        if r is not None and Path(r.path).resolve() == p.resolve():
            out.append(r)
        else:
            out.append(ImageRecord(str(im.get("dataset_id") or im["file_name"]), int(im["id"]), str(p),
                                   im.get("width"), im.get("height"), has_gt=False))
    return out, missing, failed
