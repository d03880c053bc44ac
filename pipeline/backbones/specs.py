"""The backbones this project knows: DINO ViTs (our module, DINO key names) and DINO ResNet-50 (torchvision)."""
from __future__ import annotations

from dataclasses import dataclass

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{name}/{name}.pth"


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its family, geometry and official DINO checkpoint."""

    arch: str
    family: str          # "vit" | "resnet"
    model_name: str      # the timm / torchvision model name of the same architecture (for messages)
    patch_size: int      # ViT patch size; ResNet output stride
    embed_dim: int       # feature dimension
    num_heads: int       # 0 for ResNet
    depth: int           # transformer blocks (0 for ResNet)
    weights_name: str    # official DINO release file name, without ".pth"

    @property
    def weights_file(self) -> str:
        return f"{self.weights_name}.pth"

    @property
    def url(self) -> str:
        return _DINO_URL.format(name=self.weights_name)


ARCHS: dict[str, ArchSpec] = {
    s.arch: s
    for s in (
        ArchSpec("dino_vits16", "vit", "vit_small_patch16_224", 16, 384, 6, 12, "dino_deitsmall16_pretrain"),
        ArchSpec("dino_vits8", "vit", "vit_small_patch8_224", 8, 384, 6, 12, "dino_deitsmall8_pretrain"),
        ArchSpec("dino_vitb16", "vit", "vit_base_patch16_224", 16, 768, 12, 12, "dino_vitbase16_pretrain"),
        ArchSpec("dino_vitb8", "vit", "vit_base_patch8_224", 8, 768, 12, 12, "dino_vitbase8_pretrain"),
        ArchSpec("dino_resnet50", "resnet", "resnet50", 16, 2048, 0, 0, "dino_resnet50_pretrain"),
    )
}


def get_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)} "
                         f"(arch=<name>)")
    return ARCHS[arch]
