"""DINO ResNet-50: torchvision ResNet-50, last stage dilated (output stride 16), no avgpool / fc."""
from __future__ import annotations

import torch
from torch import nn


def build_dino_resnet50() -> nn.Module:
    """torchvision key names (no ``fc.*``); the LOST reference default dilation [False, False, True].

    torchvision is imported here, not at module import: it costs about a second of start-up (it loads
    torch._dynamo), which a ViT run does not need."""
    from torchvision.models import resnet50

    model = resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    model.avgpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def resnet_layer4(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> layer4 map (B, 2048, H/16, W/16)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(img))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))
