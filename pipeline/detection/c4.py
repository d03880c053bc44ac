"""ResNet-50 C4 pieces for torchvision's ``FasterRCNN`` (detectron2's ``Res5ROIHeads`` design).

torchvision has no C4 preset, so it is assembled here:

- :class:`ResNetC4Backbone`: stem + ``layer1..layer3`` (res2..res4), one stride-16 map of 1024
  channels, returned as ``{"0": map}``.
- :class:`RoIAlignC4`: RoIAlign 14x14 on that map with ``aligned=True`` and adaptive sampling
  (detectron2's ``ROIAlignV2``, ``POOLER_SAMPLING_RATIO=0``); torchvision's ``MultiScaleRoIAlign``
  would use the legacy ``aligned=False``.
- :class:`Res5BoxHead`: ``layer4`` (res5, first block stride 2: 14x14 -> 7x7), then the extra norm
  after res5 of LOST's ``Res5ROIHeadsExtraNorm`` (from MoCo's detection recipe), then global average
  pooling to a 2048-d vector.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` (itself included) replaced by a ``FrozenBatchNorm2d`` with
    the same statistics; use the returned module."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(module, name))
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients through ``module`` and freeze its batch norms (detectron2's ``FREEZE_AT``)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return freeze_batchnorm(module)


class ResNetC4Backbone(nn.Module):
    """ResNet stem..res4 of a torchvision ResNet; keeps torchvision's attribute names."""

    out_channels = 1024

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return OrderedDict([("0", x)])


class RoIAlignC4(MultiScaleRoIAlign):
    """Single-level aligned RoIAlign at a fixed stride (a ``MultiScaleRoIAlign`` only because
    ``FasterRCNN`` type-checks ``box_roi_pool``; the multi-level machinery is bypassed)."""

    def __init__(self, output_size: int = 14, spatial_scale: float = 1.0 / 16, sampling_ratio: int = 0):
        super().__init__(["0"], output_size, sampling_ratio)
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, features: dict, proposals: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        x = features["0"]
        boxes = [b.to(x.dtype) for b in proposals]
        return roi_align(x, boxes, output_size=self.output_size, spatial_scale=self.spatial_scale,
                         sampling_ratio=self.sampling_ratio, aligned=True)


class Res5BoxHead(nn.Module):
    """res5 + optional extra norm + global average pool: (R, 1024, 14, 14) -> (R, 2048)."""

    out_channels = 2048

    def __init__(self, res5: nn.Module, extra_norm: nn.Module | None):
        super().__init__()
        self.res5 = res5
        self.norm = extra_norm if extra_norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))
