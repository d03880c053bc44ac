"""Backbone features against computations done by hand from the model's own weights."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models import resnet50

from pipeline.backbones import ARCHS, IMAGENET_MEAN, IMAGENET_STD, FeatureOutput, build_backbone, preprocess_image
from pipeline.backbones.vit import ROW_BLOCK, row_blocks, softmax_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vits16():
    return build_backbone("dino_vits16", init="random", seed=0)


@pytest.fixture(scope="module")
def vits8():
    return build_backbone("dino_vits8", init="random", seed=0)


@pytest.fixture(scope="module")
def r50():
    b = build_backbone("dino_resnet50", init="random", seed=0)
    g = torch.Generator().manual_seed(7)  # non-trivial BN statistics so the check below is sharp
    with torch.no_grad():
        for m in b.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return b


def _img(h, w, b=1, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _capture(module, store, key, pre=False):
    if pre:
        return module.register_forward_pre_hook(lambda m, a: store.__setitem__(key, a[0].clone()))
    return module.register_forward_hook(lambda m, a, out: store.__setitem__(key, out.clone()))


# --------------------------------------------------------------------------- preprocess_image
def test_preprocess_values_and_padding():
    img = np.array([[[0, 128, 255], [10, 20, 30], [255, 255, 255], [1, 2, 3], [0, 0, 0]],
                    [[50, 60, 70], [80, 90, 100], [200, 100, 0], [7, 8, 9], [255, 0, 128]],
                    [[3, 2, 1], [4, 5, 6], [9, 9, 9], [100, 150, 200], [33, 66, 99]]], dtype=np.uint8)
    t, (h, w) = preprocess_image(img, 4)
    assert (h, w) == (3, 5) and t.shape == (3, 4, 8) and t.dtype == torch.float32
    # pixel (row 1, col 2) = (200, 100, 0), by hand
    expected = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    np.testing.assert_allclose(t[:, 1, 2].numpy(), expected, atol=1e-6)
    ref = (img.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(t[:, :3, :5].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    assert torch.count_nonzero(t[:, 3:, :]) == 0 and torch.count_nonzero(t[:, :, 5:]) == 0  # zeros after norm
    t2, hw = preprocess_image(np.zeros((32, 16, 3), np.uint8), 16)
    assert t2.shape == (3, 32, 16) and hw == (32, 16)  # already a multiple: no padding
    np.testing.assert_allclose(t2[:, 0, 0].numpy(), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8), torch.zeros(4, 4, 3)])
def test_preprocess_rejects_bad_input(bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        preprocess_image(bad, 16)


# --------------------------------------------------------------------------- ViT features
@pytest.mark.parametrize("which", ["k", "q", "v"])
def test_qkv_features_match_manual_projection(vits16, which):
    m = vits16.model
    store = {}
    hk = _capture(m.blocks[-2], store, "x")  # last block input
    try:
        out = vits16.features(_img(64, 96, b=2), which=which)
    finally:
        hk.remove()
    assert isinstance(out, FeatureOutput) and out.dims == (4, 6) and out.feats.shape == (2, 24, 384)
    assert out.feats.dtype == torch.float32 and out.cls_attn is None
    last = m.blocks[-1]
    y = F.layer_norm(store["x"], (384,), last.norm1.weight, last.norm1.bias, eps=1e-6)
    qkv = F.linear(y, last.attn.qkv.weight, last.attn.qkv.bias)          # (B, 25, 3 * 384)
    part = {"q": 0, "k": 1, "v": 2}[which]
    ref = qkv[:, 1:, part * 384:(part + 1) * 384]   # heads are contiguous blocks of 64 per token
    torch.testing.assert_close(out.feats, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(out.feats.norm(dim=-1), torch.ones(2, 24))  # no L2 normalisation


def test_tokens_and_early_stop_agree_with_full_forward(vits16):
    m = vits16.model
    store = {}
    hooks = [_capture(m.blocks[-1], store, "out"), _capture(m.blocks[-1].attn.qkv, store, "qkv")]
    try:
        tok = vits16.features(_img(48, 80), which="tokens")
        full_qkv = store["qkv"]
        k = vits16.features(_img(48, 80), which="k")  # stops after the last qkv
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(tok.feats, store["out"][:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(k.feats, full_qkv[:, 1:, 384:768], atol=0, rtol=0)


def test_cls_attention_is_dino_softmax(vits16):
    m = vits16.model
    store = {}
    hk = _capture(m.blocks[-2], store, "x")
    try:
        out = vits16.features(_img(64, 48, b=2), which="tokens", with_cls_attn=True)
    finally:
        hk.remove()
    a = out.cls_attn
    assert a.shape == (2, 6, 12)
    # softmax over all tokens incl. CLS: patch part sums to 1 - (CLS self weight), strictly inside (0, 1)
    assert ((a.sum(-1) > 0) & (a.sum(-1) < 1)).all() and (a > 0).all()
    last = m.blocks[-1]
    qkv = F.linear(F.layer_norm(store["x"], (384,), last.norm1.weight, last.norm1.bias, eps=1e-6),
                   last.attn.qkv.weight, last.attn.qkv.bias)
    q = qkv[..., :384].reshape(2, 13, 6, 64)[:, 0]                       # CLS query per head
    k = qkv[..., 384:768].reshape(2, 13, 6, 64)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) / 8.0
    ref = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(a, ref[:, :, 1:], atol=1e-6, rtol=0)
    # the k/q/v path gives the same attention
    torch.testing.assert_close(vits16.features(_img(64, 48, b=2), with_cls_attn=True).cls_attn, a, atol=0, rtol=0)


def test_patch_order_is_row_major(vits16):
    """Token 1 + r*w + c is the patch at image row r, column c (checked at the embedding layer)."""
    m = vits16.model
    store = {}
    h = _capture(m.blocks[0], store, "x", pre=True)
    img = _img(48, 80)
    try:
        vits16.features(img)
    finally:
        h.remove()
    pos = m.pos_embed[0, 1:].reshape(14, 14, 384)
    pos = F.interpolate(pos.permute(2, 0, 1)[None], scale_factor=(3.1 / 14, 5.1 / 14), mode="bicubic")[0]
    w_, b_ = m.patch_embed.proj.weight, m.patch_embed.proj.bias
    for r, c in [(0, 0), (0, 4), (2, 1), (1, 3)]:
        patch = img[0, :, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
        ref = (w_ * patch).sum(dim=(1, 2, 3)) + b_ + pos[:, r, c]
        torch.testing.assert_close(store["x"][0, 1 + r * 5 + c], ref, atol=1e-4, rtol=1e-5)


def test_batch_equals_single_images(vits8):
    x = _img(32, 40, b=2, seed=3)
    both = vits8.features(x, with_cls_attn=True)
    assert both.dims == (4, 5) and both.feats.shape == (2, 20, 384) and both.cls_attn.shape == (2, 6, 20)
    one = vits8.features(x[1:])
    torch.testing.assert_close(both.feats[1:], one.feats, atol=1e-5, rtol=1e-5)


def test_hook_registered_once_and_repeatable(vits16):
    qkv = vits16.model.blocks[-1].attn.qkv
    assert len(qkv._forward_hooks) == 1
    x = _img(32, 48, seed=5)
    first = vits16.features(x, with_cls_attn=True)
    second = vits16.features(x, with_cls_attn=True)
    vits16.embed(x)
    assert len(qkv._forward_hooks) == 1
    assert torch.equal(first.feats, second.feats) and torch.equal(first.cls_attn, second.cls_attn)


def test_embed_is_normed_cls_token(vits16):
    m = vits16.model
    store = {}
    h = _capture(m.blocks[-1], store, "out")
    x = _img(32, 64, b=3)
    try:
        e = vits16.embed(x)
    finally:
        h.remove()
    assert e.shape == (3, 384)
    ref = F.layer_norm(store["out"][:, 0], (384,), m.norm.weight, m.norm.bias, eps=1e-6)
    torch.testing.assert_close(e, ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch,p,d,heads", [("dino_vitb16", 16, 768, 12), ("dino_vitb8", 8, 768, 12)])
def test_vit_base_shapes(arch, p, d, heads):
    b = build_backbone(arch, init="random")
    assert (b.patch_size, b.embed_dim, b.num_heads) == (p, d, heads)
    out = b.features(_img(32, 48), with_cls_attn=True)
    n = (32 // p) * (48 // p)
    assert out.dims == (32 // p, 48 // p) and out.feats.shape == (1, n, d) and out.cls_attn.shape == (1, heads, n)
    assert b.embed(_img(32, 48)).shape == (1, d)


def test_bad_feature_inputs(vits16):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        vits16.features(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vits16.features(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="unknown feature"):
        vits16.features(torch.zeros(1, 3, 32, 32), which="keys")


# --------------------------------------------------------------------------- ResNet-50
def test_resnet_dilated_stride16_features(r50):
    ref = resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    ref.load_state_dict(r50.model.state_dict(), strict=False)  # only fc differs (absent here)
    ref_trunk = nn.Sequential(*list(ref.children())[:-2]).eval()
    x = _img(64, 96, b=2)
    out = r50.features(x)
    assert out.dims == (4, 6) and out.feats.shape == (2, 24, 2048) and out.cls_attn is None  # stride 16
    with torch.no_grad():
        fmap = ref_trunk(x)
    assert fmap.shape == (2, 2048, 4, 6)
    for r, c in [(0, 0), (1, 5), (3, 2)]:
        torch.testing.assert_close(out.feats[:, r * 6 + c], fmap[:, :, r, c], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r50.embed(x), fmap.mean(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    assert r50.embed(x).shape == (2, 2048)
    assert r50.patch_size == 16 and r50.num_heads == 0 and "fc.weight" not in r50.model.state_dict()


def test_resnet_refuses_cls_attention_and_qv(r50):
    with pytest.raises(ValueError, match="dinoseg needs a ViT backbone"):
        r50.features(_img(32, 32), with_cls_attn=True)
    with pytest.raises(ValueError, match="no queries/values"):
        r50.features(_img(32, 32), which="q")


# --------------------------------------------------------------------------- attention in blocks of query rows
def _dino_attention(q, k, v, scale):
    """DINO's attention, literally: ``softmax((q kᵀ) * scale) v`` in one product."""
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def test_row_blocks_are_balanced_and_cover():
    assert row_blocks(5, 0) == [(0, 5)] and row_blocks(256, 256) == [(0, 256)]
    assert row_blocks(257, 256) == [(0, 128), (128, 257)]  # never a 1-row tail
    for n in range(1, 3000, 7):
        for rb in (64, 256):
            b = row_blocks(n, rb)
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
            sizes = [r1 - r0 for r0, r1 in b]
            assert max(sizes) <= max(rb, n if n <= rb else 0) and max(sizes) - min(sizes) <= 1
            assert n <= rb or min(sizes) >= rb // 2


@pytest.mark.parametrize("threads", [1, 2])
def test_row_blocked_attention_is_bit_identical_to_one_product(threads):
    """Every block size gives DINO's one-product attention bit for bit, across token counts around the
    block boundaries, batch sizes, a power-of-two scale (q scaled first) and another (scores scaled)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        ns = [*range(2, 12), 63, 64, 65, *range(127, 132), 255, 256, 257, 258, 385, 513, 769, 1030]
        for n in ns:
            for b, heads, d in ((1, 6, 64), (3, 6, 64), (1, 4, 48)):
                q, k, v = torch.randn(b, n, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4)
                ref = _dino_attention(q, k, v, d ** -0.5)
                for rb in (0, 64, ROW_BLOCK):
                    assert torch.equal(softmax_attention(q, k, v, d ** -0.5, rb), ref), (n, b, heads, d, rb)
    finally:
        torch.set_num_threads(old)


def test_features_do_not_depend_on_row_blocks(vits16):
    """The model's attention on a CPU runs in blocks (ROW_BLOCK rows); one block gives the same bits."""
    x = _img(256, 512, seed=11)  # 16 x 32 patches: 513 tokens, 3 blocks (an unbalanced split would end in 1 row)
    assert all(blk.attn.row_block == ROW_BLOCK for blk in vits16.model.blocks)
    blocked = (vits16.features(x, which="tokens", with_cls_attn=True), vits16.features(x), vits16.embed(x))
    try:
        for blk in vits16.model.blocks:
            blk.attn.row_block = 0
        plain = (vits16.features(x, which="tokens", with_cls_attn=True), vits16.features(x), vits16.embed(x))
    finally:
        for blk in vits16.model.blocks:
            blk.attn.row_block = ROW_BLOCK
    assert torch.equal(blocked[0].feats, plain[0].feats) and torch.equal(blocked[0].cls_attn, plain[0].cls_attn)
    assert torch.equal(blocked[1].feats, plain[1].feats) and torch.equal(blocked[2], plain[2])


# --------------------------------------------------------------------------- build / describe / configs
def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_backbone("dino_vits8", init="random", seed=3)
    b = build_backbone("dino_vits8", init="random", seed=3)
    c = build_backbone("dino_vits8", init="random", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.model.pos_embed, b.model.pos_embed) and not torch.equal(a.model.pos_embed, c.model.pos_embed)
    assert a.describe() == {"arch": "dino_vits8", "init": "random", "weights_path": None,
                            "weights_sha256": None, "patch_size": 8}
    assert not a.model.training
    assert all(blk.attn.fused_attn is False for blk in a.model.blocks)  # softmax(q k^T * scale), as DINO


def test_unknown_arch_and_init():
    with pytest.raises(ValueError, match="dino_vits16"):
        build_backbone("vit_huge", init="random")
    with pytest.raises(ValueError, match="backbone.init"):
        build_backbone("dino_vits16", init="imagenet")


def test_arch_specs_and_configs():
    base = "https://dl.fbaipublicfiles.com/dino/"
    expected = {"dino_vits16": (16, 384, 6, "dino_deitsmall16_pretrain"), "dino_vits8": (8, 384, 6, "dino_deitsmall8_pretrain"),
                "dino_vitb16": (16, 768, 12, "dino_vitbase16_pretrain"), "dino_vitb8": (8, 768, 12, "dino_vitbase8_pretrain"),
                "dino_resnet50": (16, 2048, 0, "dino_resnet50_pretrain")}
    assert set(ARCHS) - {a for a in ARCHS if a.startswith("dinov2_")} == set(expected)  # DINOv2: test_dinov2.py
    for arch, (p, d, h, name) in expected.items():
        s = ARCHS[arch]
        assert (s.patch_size, s.embed_dim, s.num_heads) == (p, d, h)
        assert s.url == f"{base}{name}/{name}.pth" and s.weights_file == f"{name}.pth"
        cfg = yaml.safe_load((ROOT / "conf" / "backbone" / f"{arch}.yaml").read_text())
        # only what differs from pipeline/backbones/settings.py (tests/test_config_defaults.py)
        assert cfg == {"defaults": ["/schema/backbone@_here_", "_self_"], "name": arch, "arch": arch}
