"""DINO backbones (ViT-S/B with patch 16/8, DINOv2 ViT-S/B/L/g with patch 14 with and without registers, our own
module; ResNet-50 on torchvision): weights, features."""
from pipeline.backbones.backbone import FEATURES, Backbone, FeatureOutput, build_backbone, group_by_size
from pipeline.backbones.precision import PRECISIONS, check_precision, cpu_has_native_bf16
from pipeline.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_image  # the data owns it
from pipeline.backbones.specs import ARCHS, ArchSpec, get_spec
from pipeline.backbones.vit import dino_interpolate_pos_embed, interpolate_pos_embed
from pipeline.backbones.weights import WeightsError, resolve_weights

__all__ = [
    "ARCHS", "ArchSpec", "Backbone", "FEATURES", "FeatureOutput", "IMAGENET_MEAN", "IMAGENET_STD",
    "WeightsError", "build_backbone", "dino_interpolate_pos_embed", "get_spec", "interpolate_pos_embed",
    "preprocess_image", "resolve_weights", "PRECISIONS", "check_precision", "cpu_has_native_bf16", "group_by_size",
]
