"""Unsupervised object detection: LOST and what comes after it, as a library (no Hydra, no global state).

Packages (each lists its public names in ``__all__``): ``data`` (datasets, decoding, the mining loader),
``backbones`` (DINO ViT / ResNet-50 features), ``discovery`` (the miners: LOST, DINO-seg, TokenCut, MaskCut),
``mining`` (a mining run), ``detection`` (Faster R-CNN: presets, trainer, checkpoints, inference),
``clustering`` (crop features, K-means, pseudo-labels), ``evaluation`` (CorLoc, AP, Hungarian matching),
``viz`` (pictures), ``report`` (the HTML report); modules ``weights``, ``artifacts``, ``journal``, ``rerun``,
``status``, ``provenance``. See docs/ARCHITECTURE.md.
"""
