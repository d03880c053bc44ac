"""Which dataset a stage reads (:class:`DatasetSettings`, the schema of ``conf/dataset/*.yaml``, which hold only
what differs from these defaults); :func:`pipeline.data.build.build_dataset` takes them."""
from __future__ import annotations

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
