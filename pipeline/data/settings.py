"""Which dataset a stage reads (:class:`DatasetSettings`, the schema of ``conf/dataset/*.yaml``, which hold only
what differs from these defaults); :func:`pipeline.data.build.build_dataset` takes them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from pipeline.settings import Settings


@dataclass
class DatasetSettings(Settings):
    name: str                            # used in output paths
    kind: str                            # voc07 | voc12 | coco | coco20k | folder | demo
    root: str = ""                       # where the dataset lives (ignored by demo)
    image_set: Optional[str] = None      # VOC: ImageSets/Main/<image_set>.txt; COCO: the split (val2017)
    ann_file: Optional[str] = None       # COCO instances json; None: the kind's place under root
    image_dir: Optional[str] = None      # COCO images; None: the kind's place under root
    list_file: Optional[str] = None      # coco20k: the file names; None: <root>/coco20k_filenames.txt
    max_images: Optional[int] = None     # keep the first N images in the set's order; None: all
    # mining only: shrink images whose longer side exceeds this (bicubic; boxes mapped back); None: never, as
    # the reference
    max_side: Optional[int] = None


def dataset_identity(values: dict) -> dict:
    """The dataset settings ``values`` that decide which images and annotations a stage reads, with paths resolved
    (an absolute and a relative path to one folder are the same data) and without ``max_images`` (results are per
    image: a grown image set is the same configuration)."""
    d = {k: v for k, v in values.items() if k != "max_images"}
    for key in ("root", "ann_file", "image_dir", "list_file"):
        if d.get(key):
            d[key] = os.path.realpath(os.path.expanduser(str(d[key])))
    return d
