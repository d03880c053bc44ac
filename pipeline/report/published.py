"""Published CorLoc (%) of the single-object discovery methods: the one place these numbers live.

LOST and DINO-seg: the LOST paper (Siméoni et al., BMVC 2021) and its repository; TokenCut: Wang et al.,
CVPR 2022; FOUND: Siméoni et al., CVPR 2023 (single-object protocol, the authors' head). Trainval sets of VOC07
and VOC12, and COCO20k (19,817 train2014 images).
"""
from __future__ import annotations

# (method, backbone) -> {dataset: CorLoc %}
PUBLISHED_CORLOC: dict[tuple[str, str], dict[str, float]] = {
    ("lost", "dino_vits16"): {"voc07": 61.9, "voc12": 64.0, "coco20k": 50.7},
    ("lost", "dino_vits8"): {"voc07": 55.5, "voc12": 57.0, "coco20k": 49.5},
    ("lost", "dino_vitb16"): {"voc07": 60.1, "voc12": 63.3, "coco20k": 50.0},
    ("lost", "dino_resnet50"): {"voc07": 36.8, "voc12": 42.7, "coco20k": 26.5},
    ("dinoseg", "dino_vits16"): {"voc07": 45.8, "voc12": 46.2, "coco20k": 42.1},
    ("tokencut", "dino_vits16"): {"voc07": 68.8, "voc12": 72.1, "coco20k": 58.8},
    ("tokencut", "dino_vits8"): {"voc07": 67.3, "voc12": 71.6, "coco20k": 60.7},
    ("tokencut", "dino_vitb16"): {"voc07": 68.8, "voc12": 72.4, "coco20k": 59.0},
    ("found", "dino_vits8"): {"voc07": 72.5, "voc12": 76.1, "coco20k": 62.9},
}

# miner parameters without which a method's published number does not apply (FOUND without its trained head is
# the training-free background seed alone, which the paper does not score as FOUND)
PUBLISHED_PARAMS: dict[str, dict[str, object]] = {"found": {"head": "shipped"}}

# images in the full evaluation sets the published numbers are measured on
FULL_SET_IMAGES = {"voc07": 5011, "voc12": 11540, "coco20k": 19817}


def published_corloc(method: str, backbone: str, dataset: str, params: dict | None = None) -> float | None:
    """The published CorLoc of ``method`` (lost | dinoseg | tokencut | found) with ``backbone`` (config name,
    e.g. dino_vits16) on ``dataset`` (voc07 | voc12 | coco20k), or None when there is none; with the run's miner
    ``params``, also None when they differ from :data:`PUBLISHED_PARAMS` (``miner.head=none`` is not FOUND)."""
    method = str(method).lower()
    if params is not None and any(params.get(k, v) != v for k, v in PUBLISHED_PARAMS.get(method, {}).items()):
        return None
    return PUBLISHED_CORLOC.get((method, str(backbone)), {}).get(str(dataset))
