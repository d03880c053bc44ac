"""The backbones this project knows: DINO ViTs, DINOv2 ViTs with and without registers (our module, the
official key names) and DINO ResNet-50 (torchvision)."""
from __future__ import annotations

from dataclasses import dataclass

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{name}/{name}.pth"
# DINOv2's release (dinov2/hub/backbones.py): <base>/dinov2_vit<s|b|l|g>14/<file>_pretrain.pth, registers or not
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{{name}}.pth"
FFNS = ("mlp", "swiglu")


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its family, geometry and official checkpoint.

    The fields after ``weights_name`` describe a DINOv2 ViT; their defaults are DINO's ViT (224 px position
    grid, no registers, no LayerScale, GELU MLP, DINO's interpolation: bicubic at ``(h + 0.1) / g``)."""

    arch: str
    family: str          # "vit" | "resnet"
    model_name: str      # the timm / torchvision model name of the same architecture (for messages)
    patch_size: int      # ViT patch size; ResNet output stride
    embed_dim: int       # feature dimension
    num_heads: int       # 0 for ResNet
    depth: int           # transformer blocks (0 for ResNet)
    weights_name: str    # official release file name, without ".pth"
    img_size: int = 224                 # the position embedding's grid is img_size // patch_size squared
    num_register_tokens: int = 0        # DINOv2 "registers": tokens after CLS, before the patches
    layer_scale: bool = False           # ls1.gamma / ls2.gamma per block (DINOv2)
    ffn: str = "mlp"                    # "mlp" (fc1, GELU, fc2) | "swiglu" (w12, SiLU gate, w3: DINOv2 ViT-g)
    mask_token: bool = False            # DINOv2 checkpoints hold a mask_token (training only; kept for strict loading)
    interpolate_offset: float = 0.1     # != 0: scale_factor (h + offset) / g; 0: output size (h, w) (DINOv2 reg)
    interpolate_antialias: bool = False  # F.interpolate(..., antialias=) of the position embedding
    release: str = "DINO"               # whose checkpoints (messages)
    url_template: str = _DINO_URL

    @property
    def weights_file(self) -> str:
        return f"{self.weights_name}.pth"

    @property
    def url(self) -> str:
        return self.url_template.format(name=self.weights_name)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers (ViT); 0 for a ResNet."""
        return 1 + self.num_register_tokens if self.family == "vit" else 0


def _dinov2(size: str, timm_size: str, dim: int, heads: int, depth: int, registers: bool) -> ArchSpec:
    """A DINOv2 backbone as ``dinov2/hub/backbones.py`` builds it: img_size 518, patch 14, LayerScale, mask token;
    without registers DINO's interpolation (offset 0.1, no antialias); with 4 registers ``interpolate_offset=0.0``
    (the output size) and ``interpolate_antialias=True``; ViT-g with the SwiGLU FFN."""
    base = f"dinov2_vit{size}14"
    reg = "_reg4" if registers else ""
    return ArchSpec(f"{base}{'_reg' if registers else ''}", "vit", f"vit_{timm_size}_patch14{reg}_dinov2", 14, dim,
                    heads, depth, f"{base}{reg}_pretrain", img_size=518, num_register_tokens=4 if registers else 0,
                    layer_scale=True, ffn="swiglu" if size == "g" else "mlp", mask_token=True,
                    interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=registers,
                    release="DINOv2", url_template=_DINOV2_URL.format(base=base))


ARCHS: dict[str, ArchSpec] = {
    s.arch: s
    for s in (
        ArchSpec("dino_vits16", "vit", "vit_small_patch16_224", 16, 384, 6, 12, "dino_deitsmall16_pretrain"),
        ArchSpec("dino_vits8", "vit", "vit_small_patch8_224", 8, 384, 6, 12, "dino_deitsmall8_pretrain"),
        ArchSpec("dino_vitb16", "vit", "vit_base_patch16_224", 16, 768, 12, 12, "dino_vitbase16_pretrain"),
        ArchSpec("dino_vitb8", "vit", "vit_base_patch8_224", 8, 768, 12, 12, "dino_vitbase8_pretrain"),
        ArchSpec("dino_resnet50", "resnet", "resnet50", 16, 2048, 0, 0, "dino_resnet50_pretrain"),
        *(_dinov2(size, timm_size, dim, heads, depth, registers)
          for size, timm_size, dim, heads, depth in (("s", "small", 384, 6, 12), ("b", "base", 768, 12, 12),
                                                     ("l", "large", 1024, 16, 24), ("g", "giant", 1536, 24, 40))
          for registers in (False, True)),
    )
}


def get_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)} "
                         f"(arch=<name>)")
    return ARCHS[arch]
