"""Faster R-CNN (torchvision) for train-cag / train-cad: presets, training data, trainer, inference.

- ``builders.build_detector``: ``r50_c4`` (LOST's recipe), ``r50_fpn``, ``mobilenet_fpn``; DINO ResNet-50 init.
- ``data.DetectionDataset``: a COCO json of (pseudo-)boxes -> validated samples; ``InfiniteSampler``.
- ``trainer.train``: iteration-based SGD, exact resume from ``model.pt``, DDP under torchrun.
- ``inference.predict`` / ``to_coco_results`` / ``top1_boxes``; ``pictures.write_detection_pictures``.
AP and LOST+CAD CorLoc live in ``pipeline.evaluation.coco_ap``.
"""
