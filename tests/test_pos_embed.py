"""Position embeddings: what the ViT adds must be DINO's ``interpolate_pos_encoding``, not timm's.

Two independent references: DINO's formula written out with ``F.interpolate`` (exact equality), and a
float64 NumPy bicubic (PyTorch's A = -0.75 kernel, border clamping, source index driven by the *given*
scale factor), which pins down that ``scale_factor=(h + 0.1) / g`` and not ``size=`` is used.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from pipeline.backbones import build_backbone, dino_interpolate_pos_embed

# (arch, H, W): native square, non-square, square but not native, odd multiples, same count as native
CASES = [
    ("dino_vits16", 224, 224), ("dino_vits16", 480, 352), ("dino_vits16", 352, 480),
    ("dino_vits16", 16 * 5, 16 * 7), ("dino_vits16", 16 * 13, 16 * 13), ("dino_vits16", 16 * 17, 16 * 3),
    ("dino_vits16", 112, 448), ("dino_vits16", 16, 16),
    ("dino_vits8", 64, 96), ("dino_vits8", 224, 224),
]


def _build_probe(arch):
    """A ViT whose block-0 input is exactly the added position embedding (zero patches, zero CLS)."""
    b = build_backbone(arch, init="random", seed=0)
    m = b.model
    with torch.no_grad():
        m.patch_embed.proj.weight.zero_()
        m.patch_embed.proj.bias.zero_()
        m.cls_token.zero_()
        g = torch.Generator().manual_seed(1)  # std-1 pos embed: differences show clearly
        m.pos_embed.copy_(torch.randn(m.pos_embed.shape, generator=g))
    seen = {}

    def grab_and_stop(mod, args):  # the rest of the forward is irrelevant here: skip it
        seen["x"] = args[0].clone()
        raise _Stop

    m.blocks[0].register_forward_pre_hook(grab_and_stop)
    return b, seen


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def probes():
    return {arch: _build_probe(arch) for arch in ("dino_vits16", "dino_vits8")}


def added_pos_embed(probes, arch, H, W):
    b, seen = probes[arch]
    with pytest.raises(_Stop):
        b.features(torch.zeros(1, 3, H, W), which="k")
    return seen["x"][0], b.model.pos_embed.detach()


def dino_formula(pos_embed, H, W, p):
    """DINO's interpolate_pos_encoding, written from the formula (x.shape: B, nc, H, W)."""
    n = pos_embed.shape[1] - 1
    if n == (H // p) * (W // p) and H == W:
        return pos_embed[0]
    g = math.sqrt(n)
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, int(g), int(g), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((H // p + 0.1) / g, (W // p + 0.1) / g), mode="bicubic")
    return torch.cat([pos_embed[0, :1], grid[0].permute(1, 2, 0).reshape(-1, dim)], dim=0)


def _cubic_matrix(n_out, n_in, scale):
    """Rows: PyTorch bicubic weights (A=-0.75, align_corners=False) for src = (i + .5) / scale - .5."""
    a = -0.75
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        ws = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
        for off, wgt in zip((-1, 0, 1, 2), ws):
            m[i, min(max(x0 + off, 0), n_in - 1)] += wgt
    return m


def numpy_bicubic(pos_embed, h, w, scale_h, scale_w):
    pe = pos_embed[0].double().numpy()
    g = int(round(math.sqrt(pe.shape[0] - 1)))
    grid = pe[1:].reshape(g, g, -1)
    mh, mw = _cubic_matrix(h, g, scale_h), _cubic_matrix(w, g, scale_w)
    out = np.einsum("ia,jb,abd->ijd", mh, mw, grid).reshape(h * w, -1)
    return np.concatenate([pe[:1], out], axis=0)


@pytest.mark.parametrize("arch,H,W", CASES)
def test_added_pos_embed_is_dino_formula(probes, arch, H, W):
    p = 16 if arch.endswith("16") else 8
    added, pe = added_pos_embed(probes, arch, H, W)
    assert added.shape == (1 + (H // p) * (W // p), pe.shape[-1])
    assert torch.equal(added, dino_formula(pe, H, W, p))
    assert torch.equal(dino_interpolate_pos_embed(pe, H // p, W // p)[0], added)
    if (H, W) == (224, 224):
        assert torch.equal(added, pe[0])  # native grid: unchanged, no interpolation at all


@pytest.mark.parametrize("arch,H,W", [c for c in CASES if c[1:] != (224, 224)])
def test_matches_float64_bicubic_with_given_scale(probes, arch, H, W):
    p = 16 if arch.endswith("16") else 8
    h, w = H // p, W // p
    added, pe = added_pos_embed(probes, arch, H, W)
    g = 224 // p
    ref = numpy_bicubic(pe, h, w, (h + 0.1) / g, (w + 0.1) / g)
    np.testing.assert_allclose(added.double().numpy(), ref, atol=2e-5, rtol=0)
    if (h, w) != (g, g) and h > 1 and w > 1:
        # the size-driven convention (scale = h / g) gives other values: the check above is sharp
        size_ref = numpy_bicubic(pe, h, w, h / g, w / g)
        assert np.abs(size_ref - ref).max() > 1e-3


@pytest.mark.parametrize("arch,H,W", [("dino_vits16", 480, 352), ("dino_vits16", 80, 112), ("dino_vits8", 64, 96)])
def test_timm_resampling_would_differ(probes, arch, H, W):
    p = 16 if arch.endswith("16") else 8
    added, pe = added_pos_embed(probes, arch, H, W)
    timm_pe = resample_abs_pos_embed(pe, new_size=(H // p, W // p), num_prefix_tokens=1)[0]
    assert timm_pe.shape == added.shape
    assert (timm_pe - added).abs().max() > 1e-3


def test_bad_pos_embed_grid_raises():
    with pytest.raises(ValueError, match="square"):
        dino_interpolate_pos_embed(torch.zeros(1, 1 + 15, 8), 3, 4)
