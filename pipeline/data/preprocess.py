"""Image -> network input, as the LOST reference: /255, ImageNet mean/std, zero-pad bottom/right."""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_image(img: np.ndarray, patch_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, Hp, Wp) float32, (H, W)); Hp, Wp = H, W rounded up to ``patch_size``.

    Padding is zeros added after normalisation (so padded pixels are 0, not black).
    """
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}".strip()
        raise ValueError(f"preprocess_image expects an (H, W, 3) uint8 RGB array, got {desc}; "
                         "decode with PIL: np.asarray(Image.open(path).convert('RGB'))")
    if int(patch_size) <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"empty image of size {h}x{w}")
    p = int(patch_size)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    t = t.sub(mean).div(std)
    hp, wp = -(-h // p) * p, -(-w // p) * p
    out = torch.zeros((3, hp, wp), dtype=torch.float32)
    out[:, :h, :w] = t
    return out, (h, w)


def unnormalize_image(t: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image behind a :func:`preprocess_image` tensor (padding cut off, rounded)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    rgb = (t[:, :size[0], :size[1]].detach().float().cpu() * std + mean).mul(255).round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
