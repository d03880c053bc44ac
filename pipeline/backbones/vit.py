"""DINO's Vision Transformer, written out here (no timm): the reference's operations in the reference's order.

The module tree and parameter names are DINO's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so an official DINO
checkpoint (or a timm one without its classifier head) loads with ``strict=True``. The forward is
DINO's: patch convolution, CLS token, position embedding resampled with DINO's bicubic formula (the
``+ 0.1`` offset, not timm's antialiased resize), pre-norm blocks with ``softmax((q kᵀ) * scale) v``
attention and an exact-erf GELU MLP, a final LayerNorm.

One thing is computed differently, on CPUs only, with identical results: attention runs over blocks of
query rows (:func:`softmax_attention`). Each block is ``softmax((q_rows kᵀ) * scale) v``, and every
output row depends only on its own query row, so the values are the reference's. The block sizes are
balanced (no block under half of ``row_block`` rows) because MKL's GEMM picks a different kernel for a
product of 1-3 rows; with balanced blocks the outputs are bit-identical to the one-block product
(``tests/test_backbones.py`` sweeps token counts, batch sizes and thread counts). It keeps the
``(heads, rows, N)`` scores in cache and bounds their memory: a 1200 x 1200 photo at patch 8 has
22,500 tokens, whose full score matrix alone would take about 11 GiB for ViT-S.

Reading of this module against DINO's ``vision_transformer.py`` is by the architecture in the paper and
that file's public behaviour; the code is this project's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.specs import ArchSpec

#: query rows per attention block on a CPU (0: one block, the plain product); measured in README "Performance"
ROW_BLOCK = 256


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


def row_blocks(n: int, row_block: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in ``ceil(n / row_block)`` blocks of near-equal size
    (sizes differ by at most one, none smaller than ``row_block // 2`` when ``n > row_block``)."""
    if row_block <= 0 or n <= row_block:
        return [(0, n)]
    c = -(-n // row_block)
    return [(n * i // c, n * (i + 1) // c) for i in range(c)]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      row_block: int = 0) -> torch.Tensor:
    """``softmax((q kᵀ) * scale) v`` over the last two dims, in blocks of query rows (see the module doc).

    ``q, k, v``: (..., N, d). ``row_block`` 0 (or >= N) is the plain one-block product. A power-of-two
    ``scale`` multiplies ``q`` before the product instead of the scores after it: multiplying by 2^e is
    exact in floating point (outside the subnormal range), so every partial sum is the reference's times
    2^e and the scores are bit-identical, for N x d multiplications instead of N x N."""
    kt = k.transpose(-2, -1)
    if math.frexp(scale)[0] == 0.5:  # a power of two (1/8 for 64-dim heads): scaling q is exact and cheaper
        q, scale = q * scale, None

    def probs(rows: torch.Tensor) -> torch.Tensor:
        s = rows @ kt
        return (s if scale is None else s.mul_(scale)).softmax(dim=-1)

    blocks = row_blocks(q.shape[-2], int(row_block))
    if len(blocks) == 1:
        return probs(q) @ v
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for r0, r1 in blocks:
        out[..., r0:r1, :] = probs(q[..., r0:r1, :]) @ v
    return out


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches


class Attention(nn.Module):
    """Multi-head self-attention. ``fused_attn`` (off by default, off for the exact path) uses PyTorch's
    SDPA kernel instead (for autocast runs on a GPU); ``row_block`` is the CPU query-row block size."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = False
        self.row_block = ROW_BLOCK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            y = softmax_attention(q, k, v, self.scale, self.row_block if x.device.type == "cpu" else 0)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoVisionTransformer(nn.Module):
    """DINO's ViT without a head: ``prepare_tokens`` (patches + CLS + position), ``blocks``, ``norm``."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int = 224) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def prepare_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of the patch size -> (B, 1 + h*w, D) block-0 input."""
        b, _, hh, ww = img.shape
        x = self.patch_embed(img)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return x + dino_interpolate_pos_embed(self.pos_embed, hh // self.patch_size, ww // self.patch_size)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Every token after the last block and the final norm: (B, 1 + h*w, D)."""
        x = self.prepare_tokens(img)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """The normed CLS token (B, D), as DINO's ``forward``."""
        return self.forward_features(img)[:, 0]

    @torch.no_grad()
    def init_random(self) -> None:
        """DINO's initialisation: truncated normal (std 0.02) for the position embedding, the CLS token
        and every Linear weight, zero Linear biases, unit LayerNorms (the patch convolution keeps
        PyTorch's default). Uses the global RNG: seed it first."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_dino_vit(spec: ArchSpec, init_weights: bool = True) -> DinoVisionTransformer:
    """A DINO ViT with DINO's random init (seed the RNG first), or, with ``init_weights=False``,
    PyTorch's cheap default init: only for weights about to be loaded strictly (every tensor replaced)."""
    model = DinoVisionTransformer(spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads)
    if init_weights:
        model.init_random()
    return model
