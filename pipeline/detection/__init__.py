"""Faster R-CNN (torchvision) for train-cag / train-cad: presets, training data, trainer, checkpoints, inference.

- ``settings.DetectorSettings``: how a detector is built (the schema of conf/detector, its defaults);
  ``builders.build_detector``: ``r50_c4`` (LOST's recipe), ``r50_fpn``, ``mobilenet_fpn``; DINO ResNet-50 init.
- ``data.DetectionDataset``: a COCO json of (pseudo-)boxes -> validated samples; ``InfiniteSampler``, ``TrainLoader``.
- ``schedule.Schedule`` (the schema of conf/schedule, its defaults); ``solver``: ``build_optimizer``,
  ``build_scheduler``; ``hooks``: ``Hook`` s (progress, metrics.jsonl, TensorBoard, checkpoints, yours);
  ``trainer``: ``prepare_model``, ``build_train_loader``, ``create_ddp_model``, ``Trainer`` (the loop over the
  built pieces), ``train`` (one call); exact resume, DDP under torchrun.
- ``checkpoint``: ``DetectorSpec`` (what the detector is), ``Checkpointer`` (model.pt, atomic, RNG states),
  ``load_detector(path) -> (model, spec, meta)``.
- ``inference.predict`` / ``to_coco_results`` (pictures of detections: ``pipeline.viz.detections``).
- The stages' jobs: ``run.train_detector`` (train-cag, train-cad), ``evaluate`` (evaluate-cag, evaluate-cad's
  detections and matching), ``report.detect_score_draw`` (a trained detector on records: detections, scores,
  pictures).
Scoring detections (top-1 box, LOST+CAD CorLoc, AP) lives in ``pipeline.evaluation`` (``corloc``,
``detections``, ``coco_ap``), which does not depend on this package.

The names below are imported on first use, so ``pipeline.detection.settings``/``schedule`` (what the config
schemas are) load without torchvision.
"""
from importlib import import_module

_WHERE = {"PRESETS": "settings", "DetectorSettings": "settings", "Schedule": "schedule", "build_detector": "builders",
          "Checkpointer": "checkpoint", "DetectorSpec": "checkpoint", "load_detector": "checkpoint",
          "DetectionDataset": "data", "predict": "inference", "to_coco_results": "inference", "Hook": "hooks",
          "Trainer": "trainer", "train": "trainer"}
_WHERE.update(dict.fromkeys(("DropLossRoIHeads", "with_drop_loss"), "droploss"))  # CutLER Eq. 1
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.detection' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.detection.{_WHERE[name]}"), name)
