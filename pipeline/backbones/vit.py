"""DINO ViT on timm's VisionTransformer, with DINO's own position-embedding interpolation.

timm resamples position embeddings with ``size=`` and antialiasing; DINO (and so LOST) uses
``F.interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")``. The two differ
numerically, so ``_pos_embed`` is overridden here. Fused attention is disabled on every block so
attention is ``softmax(q k^T * scale)`` as in DINO (scale = 1/8 for head dim 64 is a power of two,
so timm's ``(q * scale) @ k^T`` is bit-identical to DINO's ``(q @ k^T) * scale``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.backbones.specs import ArchSpec


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: (1, 1 + g*g, D) -> (1, 1 + h*w, D) for an h x w patch grid.

    Unchanged when the grid is the native g x g square; otherwise the g x g patch part is resized
    with bicubic interpolation at scale ``((h + 0.1) / g, (w + 0.1) / g)`` (no antialias).
    """
    n = pos_embed.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    if h == g and w == g:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
    if grid.shape[-2:] != (h, w):  # DINO asserts the same
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm ViT (class token, pos embed incl. CLS) whose ``_pos_embed`` follows DINO exactly."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # dynamic_img_size=True: patch_embed gives (B, h, w, D)
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        x = x + dino_interpolate_pos_embed(self.pos_embed, h, w)
        return self.pos_drop(x)


def build_dino_vit(spec: ArchSpec, init_weights: bool = True) -> DinoVisionTransformer:
    """A DINO ViT with timm's random init (seed the RNG first), or, with ``init_weights=False``,
    PyTorch's cheap default init: only for weights about to be loaded strictly (every tensor replaced)."""
    model = DinoVisionTransformer(
        img_size=224, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, class_token=True,
        global_pool="token", pre_norm=False, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=True, weight_init="" if init_weights else "skip",
    )
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model
