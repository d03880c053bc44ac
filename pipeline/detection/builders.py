"""Faster R-CNN presets (torchvision), one factory: :func:`build_detector`.

Presets (``num_classes`` = foreground classes, 1 for class-agnostic; the predictor has K+1 outputs):

- ``r50_c4``: LOST's recipe (detectron2 ``Base-RCNN-C4`` + ``Res5ROIHeadsExtraNorm``): ResNet-50
  stem..res4 backbone, anchors (32..512) x (0.5, 1, 2) on the stride-16 map, RoIAlign 14x14
  (aligned), res5 + extra BN + average pool as box head, RPN top-k 12000/2000 (train) and
  6000/1000 (test), 512 RoIs per image. Stem and res2 frozen (``FREEZE_AT=2``) when initialised
  from weights; ``norm="bn"`` trains the other batch norms (SyncBN under DDP, see the trainer).
  Known differences from detectron2: torchvision's box-regression losses (smooth L1, beta 1/9 for
  the RoI head) and its proposal matcher; the reference's numbers are not expected to the decimal.
- ``r50_fpn``: torchvision's ``fasterrcnn_resnet50_fpn`` structure; its ResNet body loads the same
  torchvision-format checkpoint (frozen BN, stem+res2 frozen when pretrained).
- ``mobilenet_fpn``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` structure, random init
  only (no DINO MobileNet exists); what the CPU tests use.
- ``mask_r50_fpn`` / ``mask_mobilenet_fpn``: the same two with torchvision's Mask R-CNN mask head (RoIAlign
  14x14 on the FPN levels, four 3x3 convolutions, a 28x28 mask per class), trained when the training file
  has masks; ``mask_r50_fpn`` loads the DINO ResNet-50 like ``r50_fpn``, ``mask_mobilenet_fpn`` is random only.
- ``cascade_mask_r50_fpn`` / ``cascade_mask_mobilenet_fpn`` (CutLER's detector): the two mask presets with Cascade
  R-CNN box heads (:mod:`pipeline.detection.cascade`: three stages at IoU 0.5/0.6/0.7, class-agnostic boxes);
  ``cascade_r50_fpn`` is ``r50_fpn`` with them and no mask head (CutLER's recipe on box-only pseudo-labels);
  the backbone is the mask preset's (same DINO keys), the mobilenet one has 256-wide stage heads, random only.

How a detector is built (preset, init, weights, sizes, RoI sampling, NMS) is a :class:`DetectorSettings`, the
schema of ``conf/detector/*.yaml`` and the one place of its defaults. ``init``: ``"random"`` or
``"dino"``/``"imagenet"`` (a torchvision-format ResNet-50 file given as ``weights``; nothing is ever
downloaded). What a trained detector is (settings, seed, weights sha256, classes) is a
:class:`pipeline.detection.checkpoint.DetectorSpec`, saved with the weights in its checkpoint.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.detection.settings import INITS, PRESETS, DetectorSettings, check_settings  # noqa: F401
from pipeline.detection.c4 import Res5BoxHead, ResNetC4Backbone, RoIAlignC4, freeze, freeze_batchnorm
from pipeline.detection.cascade import cascade_roi_heads
from pipeline.detection.weights import INIT_URLS, WeightsError, load_resnet50_weights

# detectron2's default multi-scale training sizes (shorter side 480..800 step 32).
TRAIN_SIZES_480_800 = tuple(range(480, 801, 32))
_RPN_TOPK = {  # (pre-NMS train, post-NMS train, pre-NMS test, post-NMS test)
    "r50_c4": (12000, 2000, 6000, 1000),
    "r50_fpn": (2000, 2000, 1000, 1000),
    "mobilenet_fpn": (2000, 2000, 1000, 1000),
    "mask_r50_fpn": (2000, 2000, 1000, 1000),
    "mask_mobilenet_fpn": (2000, 2000, 1000, 1000),
    "cascade_mask_r50_fpn": (2000, 2000, 1000, 1000),
    "cascade_mask_mobilenet_fpn": (2000, 2000, 1000, 1000),
    "cascade_r50_fpn": (2000, 2000, 1000, 1000),
}
# cascade presets: the box-head width of each of their three stages (the mobilenet one light, for CPU tests)
_CASCADE_REPRESENTATION = {"cascade_mask_r50_fpn": 1024, "cascade_mask_mobilenet_fpn": 256, "cascade_r50_fpn": 1024}
# checkpoint prefix -> model prefix, per preset
C4_KEY_MAP = {"conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", "layer1.": "backbone.layer1.",
              "layer2.": "backbone.layer2.", "layer3.": "backbone.layer3.", "layer4.": "roi_heads.box_head.res5."}
FPN_KEY_MAP = {k: "backbone.body." + k for k in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")}


class _Transform(GeneralizedRCNNTransform):
    """torchvision's transform with a test size independent of the training sizes."""

    def __init__(self, *args, test_min_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.test_min_size = int(test_min_size)

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        saved, self.min_size = self.min_size, (self.test_min_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = saved


def _check(s: DetectorSettings, num_classes: int) -> None:
    s.check()
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 foreground classes (1 = class-agnostic), got {num_classes}")
    if s.init != "random" and not s.weights:
        raise WeightsError(f"init={s.init} needs a torchvision-format ResNet-50 file: download "
                           f"{INIT_URLS[s.init]} and pass weights=/path/to/{INIT_URLS[s.init].rsplit('/', 1)[-1]} "
                           "(nothing is downloaded implicitly), or use init=random")


def _build_c4(num_classes: int, norm: str, rpn_topk, **kw) -> FasterRCNN:
    r = resnet50(weights=None)
    backbone = ResNetC4Backbone(r)
    extra_norm = nn.BatchNorm2d(2048) if norm == "bn" else None
    model = FasterRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=RoIAlignC4(14, 1.0 / 16, 0),
        box_head=Res5BoxHead(r.layer4, extra_norm),
        box_predictor=FastRCNNPredictor(2048, num_classes + 1),
        rpn_pre_nms_top_n_train=rpn_topk[0], rpn_post_nms_top_n_train=rpn_topk[1],
        rpn_pre_nms_top_n_test=rpn_topk[2], rpn_post_nms_top_n_test=rpn_topk[3], **kw)
    return model


def _finish_c4(model: FasterRCNN, pretrained: bool, norm: str) -> None:
    if pretrained:  # FREEZE_AT=2: stem and res2
        for name in ("conv1", "bn1", "layer1"):
            setattr(model.backbone, name, freeze(getattr(model.backbone, name)))
    if norm == "frozen_bn":
        freeze_batchnorm(model.backbone)
        freeze_batchnorm(model.roi_heads.box_head)


def _mask_mobilenet(num_classes: int, topk, **kw) -> MaskRCNN:
    """torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` structure (random init: trainable BN, all layers
    trained, anchors 32..512 on both levels, RPN score threshold 0.05) with a light Mask R-CNN mask head (two
    64-channel 3x3 convolutions instead of four of 256: a fifth of the CPU time of a training step)."""
    backbone = _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d), True, 6)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                    box_predictor=FastRCNNPredictor(1024, num_classes + 1), mask_head=MaskRCNNHeads(backbone.out_channels, (64, 64), 1),
                    mask_predictor=MaskRCNNPredictor(64, 64, num_classes + 1),
                    rpn_pre_nms_top_n_train=topk[0], rpn_post_nms_top_n_train=topk[1],
                    rpn_pre_nms_top_n_test=topk[2], rpn_post_nms_top_n_test=topk[3], **kw)


def build_detector(preset: str | DetectorSettings, num_classes: int = 1, *, seed: int = 0,
                   **settings) -> FasterRCNN:
    """Build a torchvision ``FasterRCNN`` (``MaskRCNN`` for a mask preset) for ``num_classes`` foreground classes from a
    :class:`DetectorSettings` (or a preset name and the settings' fields as keywords; ``settings`` given with a
    :class:`DetectorSettings` replace its fields). Random initialisation is a pure function of ``seed``; the
    global RNG is left untouched.
    """
    s = preset if isinstance(preset, DetectorSettings) else DetectorSettings(preset=preset)
    s = replace(s, **settings) if settings else s
    _check(s, num_classes)
    preset, init, weights, min_size, norm = s.preset, s.init, s.weights, s.min_size, s.norm or "bn"
    sizes = tuple(int(v) for v in (min_size if isinstance(min_size, Sequence) else (min_size,)))
    test_size = int(s.test_min_size) if s.test_min_size else max(sizes)
    topk = tuple(s.rpn_topk) if s.rpn_topk is not None else _RPN_TOPK[preset]
    pretrained = init != "random"
    kw = dict(min_size=sizes, max_size=s.max_size, box_batch_size_per_image=s.batch_size_per_image,
              rpn_batch_size_per_image=s.rpn_batch_size_per_image, box_nms_thresh=s.nms,
              box_score_thresh=s.score_thresh, box_detections_per_img=s.detections_per_img)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if preset == "r50_c4":
            model = _build_c4(num_classes, norm, topk, **kw)
            key_map = C4_KEY_MAP
        elif preset in ("r50_fpn", "mask_r50_fpn", "cascade_mask_r50_fpn", "cascade_r50_fpn"):
            backbone = resnet_fpn_backbone(
                backbone_name="resnet50", weights=None, trainable_layers=3 if pretrained else 5,
                norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
            model = (MaskRCNN if s.masks else FasterRCNN)(
                backbone, num_classes=num_classes + 1, rpn_pre_nms_top_n_train=topk[0],
                rpn_post_nms_top_n_train=topk[1], rpn_pre_nms_top_n_test=topk[2], rpn_post_nms_top_n_test=topk[3], **kw)
            key_map = FPN_KEY_MAP
        elif preset in ("mask_mobilenet_fpn", "cascade_mask_mobilenet_fpn"):
            model = _mask_mobilenet(num_classes, topk, **kw)
            key_map = None
        else:
            model = fasterrcnn_mobilenet_v3_large_fpn(
                weights=None, weights_backbone=None, num_classes=num_classes + 1, rpn_pre_nms_top_n_train=topk[0],
                rpn_post_nms_top_n_train=topk[1], rpn_pre_nms_top_n_test=topk[2], rpn_post_nms_top_n_test=topk[3],
                **kw)
            key_map = None
        if preset in _CASCADE_REPRESENTATION:  # three new box stages in place of the box head
            model.roi_heads = cascade_roi_heads(model.roi_heads, num_classes + 1, _CASCADE_REPRESENTATION[preset])
    if pretrained:
        load_resnet50_weights(model, weights, key_map)
    if preset == "r50_c4":
        _finish_c4(model, pretrained, norm)
    t = model.transform
    model.transform = _Transform(sizes, s.max_size, t.image_mean, t.image_std, test_min_size=test_size)
    return model

