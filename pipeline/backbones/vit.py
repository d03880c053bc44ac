"""DINO's and DINOv2's Vision Transformer, written out here (no timm): the reference's operations in its order.

The module tree and parameter names are the official ones, so an official checkpoint loads with
``strict=True``. DINO (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; a timm one without its classifier
head loads too); DINOv2 adds ``register_tokens`` (the models with registers), ``mask_token`` (used in training
only, kept so the official files load strictly), ``blocks.<i>.ls1.gamma`` / ``ls2.gamma`` (LayerScale) and, for
ViT-g, the SwiGLU FFN ``blocks.<i>.mlp.w12`` / ``mlp.w3`` instead of ``fc1`` / ``fc2``.

The forward is the reference's: patch convolution, CLS token, position embedding resampled by
:func:`interpolate_pos_embed` (DINO and DINOv2 without registers: bicubic at ``scale_factor = (h + 0.1) / g``,
not timm's antialiased resize; DINOv2 with registers: bicubic to the output size, antialiased), then for DINOv2
with registers the register tokens inserted between CLS and the patches (they get no position embedding),
pre-norm blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(ffn(norm2(x)))`` with ``softmax((q kᵀ) * scale) v``
attention and an exact-erf GELU MLP (or SwiGLU: ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)``), a final
LayerNorm. The DINOv2 reference is its ``Attention`` written out (``(q * scale) @ kᵀ``, the only form that gives
the attention map; identical bits for the power-of-two scale 1/8 of every DINOv2 model); DINOv2's code runs
xFormers' fused kernels instead when xFormers is installed, and its later versions PyTorch's SDPA, which agree
only to rounding.

One thing is computed differently, on CPUs only, with identical results: attention runs over blocks of
query rows (:func:`softmax_attention`). Each block is ``softmax((q_rows kᵀ) * scale) v``, and every
output row depends only on its own query row, so the values are the reference's. The block sizes are
balanced (no block under half of ``row_block`` rows) because MKL's GEMM picks a different kernel for a
product of 1-3 rows; with balanced blocks the outputs are bit-identical to the one-block product
(``tests/test_backbones.py`` sweeps token counts, batch sizes and thread counts). It keeps the
``(heads, rows, N)`` scores in cache and bounds their memory: a 1200 x 1200 photo at patch 8 has
22,500 tokens, whose full score matrix alone would take about 11 GiB for ViT-S.

Reading of this module against DINO's ``vision_transformer.py`` is by the architecture in the paper and
that file's public behaviour; the DINOv2 parts follow ``facebookresearch/dinov2`` (Apache-2.0:
``dinov2/models/vision_transformer.py``, ``dinov2/layers/{block,attention,layer_scale,mlp,swiglu_ffn}.py``,
``dinov2/hub/backbones.py``), re-written here on this module's classes; the code is this project's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.specs import ArchSpec

#: query rows per attention block on a CPU (0: one block, the plain product); measured in README "Performance"
ROW_BLOCK = 256


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int, *, offset: float = 0.1,
                          antialias: bool = False) -> torch.Tensor:
    """The official ``interpolate_pos_encoding``: (1, 1 + g*g, D) -> (1, 1 + h*w, D) for an h x w patch grid.

    Unchanged when the grid is the native g x g square; otherwise the g x g patch part is resized with
    bicubic interpolation, the CLS entry kept. ``offset`` != 0 (DINO; DINOv2 without registers: 0.1):
    ``scale_factor=((h + offset) / g, (w + offset) / g)``, which PyTorch also uses for the source coordinates,
    so the offset changes the values; ``offset`` 0 (DINOv2 with registers): ``size=(h, w)``. ``antialias``
    as ``F.interpolate`` (DINOv2 with registers: True, which for bicubic is another kernel, A = -0.5).
    """
    n = pos_embed.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    if h == g and w == g:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    if offset:
        size = {"scale_factor": (float(h + offset) / g, float(w + offset) / g)}
    else:
        size = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size)
    if grid.shape[-2:] != (h, w):  # the reference asserts the same
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: bicubic at scale ``((h + 0.1) / g, (w + 0.1) / g)``, no antialias
    (:func:`interpolate_pos_embed` with its defaults; also DINOv2's without registers)."""
    return interpolate_pos_embed(pos_embed, h, w)


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


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLU FFN (ViT-g): ``w3(silu(a) * b)``, ``a, b = w12(x).chunk(2)``; the hidden width is
    DINOv2's ``SwiGLUFFNFused`` rounding, ``(int(hidden * 2 / 3) + 7) // 8 * 8`` (4096 for ViT-g)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """DINOv2's LayerScale: ``x * gamma`` (one learned factor per channel)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block; ``layer_scale`` (DINOv2: the initial gamma) adds ``ls1``/``ls2``, None leaves them out
    (DINO: an Identity, no parameters); ``ffn`` "mlp" or "swiglu"."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale: float | None = None,
                 ffn: str = "mlp") -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"unknown ffn {ffn!r}; choose mlp or swiglu")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (Mlp if ffn == "mlp" else SwiGLUFFN)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINO's / DINOv2's ViT without a head: ``prepare_tokens`` (patches + CLS + position, then the registers),
    ``blocks``, ``norm``. The token sequence is ``[CLS, registers..., patches]``: ``num_prefix_tokens`` (1 + the
    registers) tokens come before the patch grid.

    DINOv2's arguments (``dinov2/hub/backbones.py``): ``img_size`` 518, ``layer_scale`` (LayerScale's initial
    value; the hub's ``init_values`` 1.0), ``num_register_tokens`` 4 for the models with registers, ``ffn``
    "swiglu" for ViT-g, ``mask_token``, ``interpolate_offset`` / ``interpolate_antialias`` (see
    :func:`interpolate_pos_embed`), ``token_init_std`` (1e-6: the normal std of the CLS and register tokens'
    random init; None: DINO's truncated normal, std 0.02)."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int = 224, *,
                 num_register_tokens: int = 0, layer_scale: float | None = None, ffn: str = "mlp",
                 mask_token: bool = False, interpolate_offset: float = 0.1, interpolate_antialias: bool = False,
                 token_init_std: float | None = None) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.patch_size = patch_size
        self.num_register_tokens = int(num_register_tokens)
        self.num_prefix_tokens = 1 + self.num_register_tokens
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self.token_init_std = token_init_std
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, layer_scale=layer_scale, ffn=ffn)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None

    def prepare_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of the patch size -> (B, 1 + R + h*w, D) block-0 input (R registers)."""
        b, _, hh, ww = img.shape
        x = self.patch_embed(img)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, hh // self.patch_size, ww // self.patch_size,
                                      offset=self.interpolate_offset, antialias=self.interpolate_antialias)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Every token after the last block and the final norm: (B, 1 + R + h*w, D)."""
        x = self.prepare_tokens(img)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """The normed CLS token (B, D), as DINO's ``forward`` (DINOv2's ``x_norm_clstoken``)."""
        return self.forward_features(img)[:, 0]

    @torch.no_grad()
    def init_random(self) -> None:
        """The reference's initialisation: truncated normal (std 0.02) for the position embedding and every
        Linear weight, zero Linear biases, unit LayerNorms (the patch convolution keeps PyTorch's default);
        the CLS token truncated normal (std 0.02, DINO) or, with ``token_init_std``, normal with that std
        like the registers (DINOv2: 1e-6); LayerScale keeps its initial value, the mask token zeros. Uses the
        global RNG: seed it first."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.token_init_std is None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            nn.init.normal_(self.cls_token, std=self.token_init_std)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=self.token_init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


#: LayerScale's initial value for a random DINOv2 model: the hub constructors' ``init_values`` (1.0)
DINOV2_LAYER_SCALE_INIT = 1.0


def build_dino_vit(spec: ArchSpec, init_weights: bool = True) -> DinoVisionTransformer:
    """A DINO / DINOv2 ViT of ``spec`` with the reference's random init (seed the RNG first), or, with
    ``init_weights=False``, PyTorch's cheap default init: only for weights about to be loaded strictly (every
    tensor replaced)."""
    model = DinoVisionTransformer(
        spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.img_size,
        num_register_tokens=spec.num_register_tokens,
        layer_scale=DINOV2_LAYER_SCALE_INIT if spec.layer_scale else None, ffn=spec.ffn, mask_token=spec.mask_token,
        interpolate_offset=spec.interpolate_offset, interpolate_antialias=spec.interpolate_antialias,
        token_init_std=1e-6 if spec.release == "DINOv2" else None)
    if init_weights:
        model.init_random()
    return model
