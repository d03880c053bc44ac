"""Faster R-CNN (torchvision) for train-cag / train-cad: presets, training data, trainer, checkpoints, inference.

- ``builders.build_detector``: ``r50_c4`` (LOST's recipe), ``r50_fpn``, ``mobilenet_fpn``; DINO ResNet-50 init.
- ``data.DetectionDataset``: a COCO json of (pseudo-)boxes -> validated samples; ``InfiniteSampler``.
- ``trainer``: ``Schedule`` (conf/schedule fields), ``Trainer`` + ``Hook`` s (progress, metrics.jsonl,
  TensorBoard, checkpoints, yours), ``train`` (one call); exact resume, DDP under torchrun.
- ``checkpoint``: ``DetectorSpec`` (what the detector is), ``Checkpointer`` (model.pt, atomic, RNG states),
  ``load_detector(path) -> (model, spec, meta)``.
- ``inference.predict`` / ``to_coco_results`` (pictures of detections: ``pipeline.viz.detections``).
Scoring detections (top-1 box, LOST+CAD CorLoc, AP) lives in ``pipeline.evaluation`` (``corloc``,
``detections``, ``coco_ap``), which does not depend on this package.
"""
from pipeline.detection.builders import PRESETS, build_detector
from pipeline.detection.checkpoint import Checkpointer, DetectorSpec, load_detector
from pipeline.detection.data import DetectionDataset
from pipeline.detection.inference import predict, to_coco_results
from pipeline.detection.trainer import Hook, Schedule, Trainer, train

__all__ = ["PRESETS", "Checkpointer", "DetectionDataset", "DetectorSpec", "Hook", "Schedule", "Trainer",
           "build_detector", "load_detector", "predict", "to_coco_results", "train"]
