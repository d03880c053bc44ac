"""End to end against an independent implementation of the reference's forward and LOST.

The test re-implements, from the DINO/LOST papers' architecture and the formulas in docs/ARCHITECTURE.md
("Exactness"), the ViT forward (pre-norm blocks, softmax(q kᵀ / sqrt(d)) attention, GELU MLP, DINO's bicubic position
embedding with the +0.1 offset) using only the state dict's tensors and torch.nn.functional, then LOST
(degree, stable seed order, expansion, 4-connected component of the seed). On real VOC images with
random weights the library's keys, seed and box must equal it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.backbones import build_backbone, preprocess_image
from pipeline.data import build_dataset, load_image
from pipeline.discovery import lost

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_keys(sd: dict, img: torch.Tensor, patch: int, heads: int) -> torch.Tensor:
    """Keys of the last block, heads concatenated, CLS dropped: (N, D)."""
    _, _, H, W = img.shape
    h, w = H // patch, W // patch
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(1, -1, -1), x], dim=1)
    pos = sd["pos_embed"]
    g = int(math.sqrt(pos.shape[1] - 1))
    if (h, w) != (g, g):
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)
    x = x + pos
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    d = x.shape[-1]
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
        if i == depth - 1:
            k = qkv.reshape(1, -1, 3, heads, d // heads)[:, :, 1]
            return k.reshape(1, -1, d)[0, 1:]
        q, k, v = qkv.reshape(1, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        y = (a @ v).transpose(1, 2).reshape(1, -1, d)
        x = x + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                     p("mlp.fc2.bias"))
        x = x + y
    raise AssertionError("unreachable")


def _reference_lost(feats: torch.Tensor, h: int, w: int, patch: int, H: int, W: int, k_patches: int = 100):
    A = (feats @ feats.T).numpy()
    pos = A > 0
    np.fill_diagonal(pos, False)
    degree = pos.sum(axis=1)
    order = sorted(range(len(degree)), key=lambda i: (degree[i], i))
    seed = order[0]
    sim = [p for p in order[:k_patches] if A[seed, p] > 0]
    heat = A[sim].sum(axis=0).reshape(h, w)
    labels, _ = scipy.ndimage.label(heat > 0)
    ys, xs = np.nonzero(labels == labels[seed // w, seed % w])
    box = [xs.min() * patch, ys.min() * patch, min((xs.max() + 1) * patch, W), min((ys.max() + 1) * patch, H)]
    return seed, box


@pytest.mark.parametrize("arch", ["dino_vits16", "dino_vits8"])
def test_keys_seed_and_box_match_the_reference_on_voc_images(voc07_mini, arch):
    backbone = build_backbone(arch, init="random", seed=3)
    sd = {k: v.detach() for k, v in backbone.model.state_dict().items()}
    ds = build_dataset("voc07", str(voc07_mini), max_images=3 if arch == "dino_vits16" else 1)
    checked = 0
    for rec in ds.records:
        img = load_image(rec.path)
        if arch == "dino_vits8":
            img = img[:200, :264]  # ViT-S/8 on a whole VOC image is slow on 2 cores; a non-square crop
        x, (H, W) = preprocess_image(img, backbone.patch_size)
        out = backbone.features(x[None], which="k")
        with torch.no_grad():
            ref = _reference_keys(sd, x[None], backbone.patch_size, backbone.num_heads)
        torch.testing.assert_close(out.feats[0], ref, rtol=0, atol=0)
        h, w = out.dims
        res = lost(out.feats[0], out.dims, backbone.patch_size, (H, W))
        seed, box = _reference_lost(ref, h, w, backbone.patch_size, H, W)
        assert res.seed == seed and res.box.tolist() == [float(v) for v in box], rec.image_id
        checked += 1
    assert checked == len(ds.records)
