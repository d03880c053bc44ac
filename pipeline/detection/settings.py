"""How a detector is built: :class:`DetectorSettings`, the schema of ``conf/detector/*.yaml``.

The one place of the detector's defaults: Hydra registers this class as the ``detector`` group's schema
(``stages/config.py``), the YAML files hold only what differs, :func:`pipeline.detection.builders.build_detector`
takes it, and a :class:`pipeline.detection.checkpoint.DetectorSpec` embeds it. Plain Python (no torch), so
the config can be typed without importing the models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, List, Optional, Sequence

PRESETS = ("r50_c4", "r50_fpn", "mobilenet_fpn", "mask_r50_fpn", "mask_mobilenet_fpn", "cascade_mask_r50_fpn",
           "cascade_mask_mobilenet_fpn", "cascade_r50_fpn")
# Mask R-CNN: a mask head beside the box head (the cascade_ ones: Cascade Mask R-CNN, three box stages)
MASK_PRESETS = ("mask_r50_fpn", "mask_mobilenet_fpn", "cascade_mask_r50_fpn", "cascade_mask_mobilenet_fpn")
RANDOM_ONLY = ("mobilenet_fpn", "mask_mobilenet_fpn", "cascade_mask_mobilenet_fpn")  # no DINO MobileNet exists
INITS = ("random", "dino", "imagenet")



def from_plain(cls, d: dict, what: str):
    """An instance of the dataclass ``cls`` from a plain dict (a resolved config section); a key that is not
    a field is an error naming the fields."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {', '.join(sorted(known))}")
    return cls(**dict(d))

@dataclass
class DetectorSettings:
    """How a detector is built, besides its classes and seed: the schema of ``conf/detector/*.yaml`` (the YAML
    files hold only what differs from these defaults). ``init``: ``"random"`` or ``"dino"``/``"imagenet"``
    (a torchvision-format ResNet-50 file given as ``weights``); ``min_size``: training shorter side(s), several
    = multi-scale training (one random choice per batch); ``test_min_size``: the shorter side at inference
    (None: the largest training size); ``rpn_topk``: (pre-NMS train, post-NMS train, pre-NMS test, post-NMS
    test), None: the preset's; ``nms``: per-class NMS IoU of the final detections; ``norm`` (r50_c4 only):
    ``"bn"`` trains the batch norms (SyncBN under DDP), ``"frozen_bn"`` freezes them all (tiny batches), None:
    ``"bn"``. ``name`` only labels the settings."""
    preset: str = "r50_c4"
    name: str = "custom"
    init: str = "random"
    weights: Optional[str] = None
    min_size: Any = 800  # one shorter side (px) or a list of them
    max_size: int = 1333
    test_min_size: Optional[int] = None
    nms: float = 0.4
    score_thresh: float = 0.01
    batch_size_per_image: int = 512  # RoIs sampled per image for the box head
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN
    rpn_topk: Optional[List[int]] = None
    detections_per_img: int = 100
    norm: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorSettings":
        """From a plain dict (e.g. the resolved ``detector`` config); unknown keys are an error."""
        return from_plain(cls, d, "detector setting")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def masks(self) -> bool:
        """The detector predicts a mask with every box (a Mask R-CNN preset)."""
        return self.preset in MASK_PRESETS

    def check(self) -> None:
        """Every value in its range (a ValueError naming the first parameter that is not), checked without
        building anything, so a bad setting is refused before a stage touches its results."""
        preset, init = self.preset, self.init
        if preset not in PRESETS:
            raise ValueError(f"unknown detector preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if init not in INITS:
            raise ValueError(f"unknown detector init {init!r}; choose one of {', '.join(INITS)}")
        if init != "random" and preset in RANDOM_ONLY:
            raise ValueError(f"init {init} is not available for preset {preset}, which supports only init "
                             "random (no such MobileNet checkpoint); use preset r50_c4, r50_fpn, mask_r50_fpn or "
                             "cascade_mask_r50_fpn for pretrained weights")
        sizes = list(self.min_size) if isinstance(self.min_size, Sequence) else [self.min_size]
        positive = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1  # noqa: E731
        unit = lambda v: isinstance(v, (int, float)) and 0 <= v <= 1  # noqa: E731
        topk = self.rpn_topk
        rules = [("min_size", bool(sizes) and all(positive(v) for v in sizes), "one or more sizes >= 1 (px)"),
                 ("max_size", positive(self.max_size), ">= 1 (px)"),
                 ("test_min_size", self.test_min_size is None or positive(self.test_min_size), ">= 1 (px) or None"),
                 ("batch_size_per_image", positive(self.batch_size_per_image), ">= 1"),
                 ("rpn_batch_size_per_image", positive(self.rpn_batch_size_per_image), ">= 1"),
                 ("rpn_topk", topk is None or (len(topk) == 4 and all(positive(v) for v in topk)),
                  "None or 4 counts >= 1 (pre/post-NMS train, pre/post-NMS test)"),
                 ("nms", unit(self.nms), "an IoU in [0, 1]"), ("score_thresh", unit(self.score_thresh), "in [0, 1]"),
                 ("detections_per_img", positive(self.detections_per_img), ">= 1"),
                 ("norm", self.norm in (None, "bn", "frozen_bn"), "'bn' or 'frozen_bn'")]
        for name, ok, what in rules:
            if not ok:
                raise ValueError(f"detector {preset}: {name} must be {what}, got {getattr(self, name)!r}")


def check_settings(preset: str, **settings) -> None:
    """:meth:`DetectorSettings.check` of ``preset`` with ``settings`` (the fields of :class:`DetectorSettings`)."""
    DetectorSettings(preset=preset, **settings).check()
