"""DINOv2 backbones (with and without registers) against the official model's definition.

The expectations are written here from the official code (facebookresearch/dinov2, Apache-2.0:
``dinov2/models/vision_transformer.py``, ``dinov2/layers/``, ``dinov2/hub/backbones.py``), not from the library:

- the key list of the official ViT-S/14-reg4 checkpoint, by hand (module registration order of the official
  ``DinoVisionTransformer``: its own parameters, then ``patch_embed``, ``blocks``, ``norm``);
- ``official_interpolate_pos_encoding``: the official ``interpolate_pos_encoding`` in functional form (the
  ``interpolate_offset`` branch: ``scale_factor`` with the offset, else ``size``; ``antialias`` as given), and a
  float64 NumPy model of PyTorch's antialiased bicubic (Keys' A = -0.5 kernel, normalised over the window),
  which pins down that the models with registers resize to the output size with antialiasing;
- ``official_forward``: ``prepare_tokens_with_masks`` + ``Block`` + ``Attention`` (``(q * scale) @ kᵀ``,
  softmax, ``@ v``) + ``LayerScale`` + ``Mlp`` / ``SwiGLUFFN`` + the final norm, from the state dict's tensors
  with torch.nn.functional only.

The library's tokens, keys, queries, values, CLS attention and CLS embedding must equal them bit for bit
(``torch.equal``). timm's DINOv2-with-registers model (its checkpoint filter maps the official keys; eager
attention) is a third, independent implementation: its normed patch tokens must be equal too. Nothing here
touches the network.
"""
from __future__ import annotations

import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.backbones import ARCHS, WeightsError, build_backbone, interpolate_pos_embed
from pipeline.backbones.backbone import Backbone
from pipeline.backbones.specs import ArchSpec
from pipeline.backbones.vit import build_dino_vit
from stage_utils import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
DINOV2 = [a for a in ARCHS if a.startswith("dinov2_")]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(url, dst, *a, **k):
        raise urllib.error.URLError(f"test: network disabled ({url})")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# ----------------------------------------------------------------------------------------- the official model
def official_key_list(dim: int, depth: int, registers: bool, mlp: tuple[str, str] = ("fc1", "fc2")) -> list[str]:
    """The keys of the official checkpoint (``model.state_dict()`` of the hub model), in order."""
    own = ["cls_token", "pos_embed"] + (["register_tokens"] if registers else []) + ["mask_token"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "ls1.gamma", "norm2.weight", "norm2.bias", f"mlp.{mlp[0]}.weight", f"mlp.{mlp[0]}.bias",
             f"mlp.{mlp[1]}.weight", f"mlp.{mlp[1]}.bias", "ls2.gamma"]
    return (own + ["patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{k}" for i in range(depth) for k in block] + ["norm.weight", "norm.bias"])


# ViT-S/14 with 4 registers, written out: what dinov2_vits14_reg4_pretrain.pth holds (shapes for img_size 518)
VITS14_REG4_HEAD = {"cls_token": (1, 1, 384), "pos_embed": (1, 1370, 384), "register_tokens": (1, 4, 384),
                    "mask_token": (1, 384), "patch_embed.proj.weight": (384, 3, 14, 14),
                    "patch_embed.proj.bias": (384,)}
VITS14_BLOCK = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
                "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "ls1.gamma": (384,), "norm2.weight": (384,),
                "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
                "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,), "ls2.gamma": (384,)}


def official_interpolate_pos_encoding(pos_embed, npatch, w, h, patch, offset, antialias):
    """The official ``interpolate_pos_encoding(x, w, h)`` (``x.shape[1] - 1 == npatch``; ``w, h`` are the input's
    dims 2 and 3 as the official code names them, i.e. height then width)."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    M = int(math.sqrt(N))
    assert N == M * M
    if offset:
        kwargs = {"scale_factor": (float(w0 + offset) / M, float(h0 + offset) / M)}
    else:
        kwargs = {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_forward(sd: dict, img: torch.Tensor, spec: ArchSpec) -> dict:
    """``forward_features`` of the official model (eval, no masks) plus the last block's qkv and attention."""
    p, heads, R = spec.patch_size, spec.num_heads, spec.num_register_tokens
    B, _, w, h = img.shape
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), dim=1)
    x = x + official_interpolate_pos_encoding(sd["pos_embed"], x.shape[1] - 1, w, h, p, spec.interpolate_offset,
                                              spec.interpolate_antialias)
    if R:
        x = torch.cat((x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]), dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        _, N, C = x.shape
        y = F.layer_norm(x, (C,), g("norm1.weight"), g("norm1.bias"), eps=1e-6)
        qkv_flat = F.linear(y, g("attn.qkv.weight"), g("attn.qkv.bias"))
        qkv = qkv_flat.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), g("attn.proj.weight"), g("attn.proj.bias"))
        x = x + y * g("ls1.gamma")
        y = F.layer_norm(x, (C,), g("norm2.weight"), g("norm2.bias"), eps=1e-6)
        if f"blocks.{i}.mlp.w12.weight" in sd:
            x1, x2 = F.linear(y, g("mlp.w12.weight"), g("mlp.w12.bias")).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, g("mlp.w3.weight"), g("mlp.w3.bias"))
        else:
            y = F.linear(F.gelu(F.linear(y, g("mlp.fc1.weight"), g("mlp.fc1.bias"))), g("mlp.fc2.weight"),
                         g("mlp.fc2.bias"))
        x = x + y * g("ls2.gamma")
    x_norm = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return {"x_prenorm": x, "x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1 + R:],
            "qkv": qkv_flat.reshape(B, N, 3, C), "attn": attn}


def _perturbed(backbone: Backbone, seed: int = 1) -> dict:
    """Make every DINOv2-only tensor non-trivial (LayerScale off 1, visible registers and CLS), load it, return the
    state dict: a LayerScale or register mistake then shows in every output."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    for k in sd:
        if k.endswith(("ls1.gamma", "ls2.gamma")):
            sd[k] = 0.25 + torch.rand(sd[k].shape, generator=gen)
        elif k in ("register_tokens", "cls_token"):
            sd[k] = torch.randn(sd[k].shape, generator=gen)
    backbone.model.load_state_dict(sd, strict=True)
    return sd


def _img(h, w, seed=0):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vits14_reg():
    b = build_backbone("dinov2_vits14_reg", init="random", seed=0)
    return b, _perturbed(b)


@pytest.fixture(scope="module")
def vits14():
    b = build_backbone("dinov2_vits14", init="random", seed=0)
    return b, _perturbed(b)


# ----------------------------------------------------------------------------------------- specs and configs
def test_specs_urls_and_configs():
    assert sorted(DINOV2) == sorted(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg"))
    geometry = {"s": (384, 6, 12), "b": (768, 12, 12), "l": (1024, 16, 24), "g": (1536, 24, 40)}
    for arch in DINOV2:
        s, reg = ARCHS[arch], arch.endswith("_reg")
        size = arch[len("dinov2_vit")]
        file = f"dinov2_vit{size}14{'_reg4' if reg else ''}_pretrain"
        assert (s.embed_dim, s.num_heads, s.depth) == geometry[size] and s.embed_dim // s.num_heads == 64
        assert (s.family, s.patch_size, s.img_size, s.num_register_tokens) == ("vit", 14, 518, 4 if reg else 0)
        assert s.layer_scale and s.mask_token and s.ffn == ("swiglu" if size == "g" else "mlp")
        # the hub: interpolate_offset 0.1 / antialias False by default, 0.0 / True for the _reg models
        assert (s.interpolate_offset, s.interpolate_antialias) == ((0.0, True) if reg else (0.1, False))
        assert s.weights_file == f"{file}.pth"
        assert s.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{file}.pth"
        assert s.num_prefix_tokens == (5 if reg else 1)
        cfg = yaml.safe_load((ROOT / "conf" / "backbone" / f"{arch}.yaml").read_text())
        assert cfg == {"defaults": ["/schema/backbone@_here_", "_self_"], "name": arch, "arch": arch}
    assert ARCHS["dinov2_vits14_reg"].url == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert ARCHS["dinov2_vitg14"].model_name == "vit_giant_patch14_dinov2"


@pytest.mark.parametrize("arch", DINOV2)
def test_config_composes(arch):
    cfg = compose_cfg("mine", [f"backbone={arch}", "dataset=voc07"])
    assert cfg.backbone.arch == arch and cfg.stage_dir.endswith(f"voc07/{arch}/mine")


# ----------------------------------------------------------------------------------------- key names
def test_vits14_reg_keys_are_the_official_checkpoints(vits14_reg):
    b, _ = vits14_reg
    expected = list(VITS14_REG4_HEAD) + [f"blocks.{i}.{k}" for i in range(12) for k in VITS14_BLOCK] + \
        ["norm.weight", "norm.bias"]
    sd = b.model.state_dict()
    assert list(sd) == expected == official_key_list(384, 12, registers=True)
    shapes = {**VITS14_REG4_HEAD, **{f"blocks.{i}.{k}": s for i in range(12) for k, s in VITS14_BLOCK.items()},
              "norm.weight": (384,), "norm.bias": (384,)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes


@pytest.mark.parametrize("arch", DINOV2)
def test_every_arch_has_the_official_keys(arch):
    """Built on the meta device (no memory: ViT-g has 1.1 B parameters), keys and shapes of every model."""
    s = ARCHS[arch]
    with torch.device("meta"):
        m = build_dino_vit(s, init_weights=False)
    mlp = ("w12", "w3") if s.ffn == "swiglu" else ("fc1", "fc2")
    sd = m.state_dict()
    assert list(sd) == official_key_list(s.embed_dim, s.depth, s.num_register_tokens > 0, mlp)
    d = s.embed_dim
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, d) and sd["mask_token"].shape == (1, d)
    assert sd["patch_embed.proj.weight"].shape == (d, 3, 14, 14)
    hidden = 4096 if s.ffn == "swiglu" else 4 * d  # SwiGLUFFNFused: (int(4 d * 2 / 3) + 7) // 8 * 8
    first = sd[f"blocks.0.mlp.{mlp[0]}.weight"].shape
    assert first == ((2 * hidden, d) if s.ffn == "swiglu" else (hidden, d))
    assert sd[f"blocks.0.mlp.{mlp[1]}.weight"].shape == (d, hidden)
    assert ("register_tokens" in sd) == arch.endswith("_reg")


def test_random_init_is_the_official_scheme():
    b = build_backbone("dinov2_vits14_reg", init="random", seed=5)
    m = b.model
    assert b.describe() == {"arch": "dinov2_vits14_reg", "init": "random", "weights_path": None,
                            "weights_sha256": None, "patch_size": 14}
    assert m.cls_token.abs().max() < 1e-4 and m.register_tokens.abs().max() < 1e-4  # normal, std 1e-6
    assert m.register_tokens.abs().max() > 0 and torch.count_nonzero(m.mask_token) == 0
    assert all(torch.equal(blk.ls1.gamma, torch.ones(384)) for blk in m.blocks)   # the hub's init_values 1.0
    assert 0.019 < m.pos_embed.std() < 0.021  # trunc_normal_(std=0.02) (cut at +-2: in effect a normal)
    assert torch.count_nonzero(m.blocks[3].attn.qkv.bias) == 0
    again = build_backbone("dinov2_vits14_reg", init="random", seed=5)
    assert all(torch.equal(a, c) for a, c in zip(m.state_dict().values(), again.model.state_dict().values()))


# ----------------------------------------------------------------------------------------- strict loading
def test_official_file_round_trip_and_strict_refusals(vits14_reg, tmp_path):
    b0, sd = vits14_reg
    x = _img(56, 70)
    path = tmp_path / ARCHS["dinov2_vits14_reg"].weights_file
    torch.save(sd, path)
    b = build_backbone("dinov2_vits14_reg", weights=path)
    fa, fb = b.features(x, with_cls_attn=True), b0.features(x, with_cls_attn=True)
    assert torch.equal(fa.feats, fb.feats) and torch.equal(fa.cls_attn, fb.cls_attn)
    assert b.describe()["weights_path"] == str(path) and b.init == "pretrained"

    def refused(state, arch="dinov2_vits14_reg", name="bad.pth"):
        bad = tmp_path / name
        torch.save(state, bad)
        with pytest.raises(WeightsError) as e:
            build_backbone(arch, weights=bad)
        assert str(bad) in str(e.value) and arch in str(e.value)
        return str(e.value)

    msg = refused({k: v for k, v in sd.items() if k != "register_tokens"})
    assert "missing keys: register_tokens" in msg
    msg = refused({k: v for k, v in sd.items() if k != "blocks.7.ls2.gamma"})
    assert "missing keys: blocks.7.ls2.gamma" in msg
    msg = refused({**sd, "blocks.0.ls1.scale": torch.ones(384)})
    assert "unexpected keys: blocks.0.ls1.scale" in msg
    # the file without registers does not fit the model with them, nor the other way round
    assert "unexpected keys: register_tokens" in refused(sd, arch="dinov2_vits14")
    # a DINO (v1) ViT-S/16 file: no LayerScale, no mask token, another patch size
    v1 = build_backbone("dino_vits16", init="random").model.state_dict()
    msg = refused(v1, name="dino_deitsmall16_pretrain.pth")
    assert "missing keys: register_tokens, mask_token, blocks.0.ls1.gamma" in msg
    assert "patch_embed.proj.weight: file (384, 3, 16, 16) vs model (384, 3, 14, 14)" in msg


def test_download_from_the_official_url_and_offline_message(vits14_reg, tmp_path, monkeypatch):
    _, sd = vits14_reg
    spec = ARCHS["dinov2_vits14_reg"]
    wdir, cache = tmp_path / "weights", tmp_path / "cache"
    with pytest.raises(WeightsError) as e:
        build_backbone("dinov2_vits14_reg", weights_dir=wdir, cache_dir=cache)
    msg = str(e.value)
    for needle in (str(wdir / "dinov2_vits14_reg4_pretrain.pth"), str(cache / "dinov2_vits14_reg4_pretrain.pth"),
                   "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
                   "network disabled", "weights=", "weights_dir=", "init=random"):
        assert needle in msg, needle
    calls = []

    def fake_download(url, dst, *a, **k):
        calls.append((url, dst))
        torch.save(sd, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    b = build_backbone("dinov2_vits14_reg", weights_dir=wdir, cache_dir=cache)
    assert calls == [(spec.url, str(cache / spec.weights_file))] and b.weights_path == str(cache / spec.weights_file)


# ----------------------------------------------------------------------------------------- position embedding
def _aa_cubic_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Rows: PyTorch's antialiased bicubic weights for ``size=n_out`` (PIL's scheme: Keys' kernel with A = -0.5,
    support scaled when shrinking, weights normalised over the window, no border clamping)."""
    a = -0.5

    def cubic(t):
        t = abs(t)
        if t < 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0
    scale = n_in / n_out
    support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        wts = np.array([cubic((j - center + 0.5) * inv) for j in range(lo, hi)])
        m[i, lo:hi] = wts / wts.sum()
    return m


# (H, W) in pixels: native 518 square, non-square both ways, square but not native, one patch, larger than native,
# a thin strip
POS_CASES = [(518, 518), (42, 56), (56, 42), (14 * 20, 14 * 20), (14, 14), (14 * 40, 14 * 45), (14 * 3, 14 * 29)]


def _pos_probe(backbone, H, W):
    """The block-0 input of an image of zeros with zero patch embedding and zero CLS/register tokens: the added
    position embedding, registers in their place."""
    m = backbone.model
    saved = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("patch_embed", "cls_token", "register"))}
    seen = {}

    class Stop(Exception):
        pass

    def grab(mod, args):
        seen["x"] = args[0].clone()
        raise Stop
    with torch.no_grad():
        for k in saved:
            m.state_dict()[k].zero_()
    h = m.blocks[0].register_forward_pre_hook(grab)
    try:
        with pytest.raises(Stop):
            backbone.features(torch.zeros(1, 3, H, W))
    finally:
        h.remove()
        with torch.no_grad():
            for k, v in saved.items():
                m.state_dict()[k].copy_(v)
    return seen["x"][0]


@pytest.mark.parametrize("H,W", POS_CASES)
@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_added_pos_embed_is_the_official_interpolation(vits14, vits14_reg, arch, H, W):
    b, sd = vits14_reg if arch.endswith("_reg") else vits14
    s = ARCHS[arch]
    h, w = H // 14, W // 14
    pe = b.model.pos_embed.detach()
    official = official_interpolate_pos_encoding(pe, h * w, H, W, 14, s.interpolate_offset, s.interpolate_antialias)
    ours = interpolate_pos_embed(pe, h, w, offset=s.interpolate_offset, antialias=s.interpolate_antialias)
    assert torch.equal(ours, official)
    added = _pos_probe(b, H, W)
    R = s.num_register_tokens
    assert added.shape == (1 + R + h * w, 384)
    assert torch.equal(added[:1], official[0, :1]) and torch.equal(added[1 + R:], official[0, 1:])
    assert torch.count_nonzero(added[1:1 + R]) == 0  # registers: no position embedding
    if (h, w) == (37, 37):
        assert torch.equal(official, pe)


@pytest.mark.parametrize("h,w", [(3, 4), (20, 20), (40, 45), (3, 29), (60, 37), (1, 1)])
def test_reg_interpolation_is_antialiased_to_the_size(h, w):
    """float64 pins the convention down: the _reg models resize to (h, w) with the antialiased kernel, which is
    neither DINO's offset scale factor nor the plain bicubic."""
    pe = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(h * 100 + w), dtype=torch.float64)
    grid = pe[0, 1:].reshape(37, 37, 8).numpy()
    ref = np.einsum("ia,jb,abd->ijd", _aa_cubic_matrix(h, 37), _aa_cubic_matrix(w, 37), grid).reshape(h * w, 8)
    ours = interpolate_pos_embed(pe, h, w, offset=0.0, antialias=True)[0]
    np.testing.assert_allclose(ours[1:].numpy(), ref, atol=1e-12, rtol=0)
    assert torch.equal(ours[0], pe[0, 0])
    for other in (dict(offset=0.1, antialias=False), dict(offset=0.0, antialias=False)):
        diff = (interpolate_pos_embed(pe, h, w, **other)[0, 1:].numpy() - ref)
        assert np.abs(diff).max() > 1e-2, other


# ----------------------------------------------------------------------------------------- features, bit for bit
def _check_against_official(b: Backbone, sd: dict, x: torch.Tensor) -> None:
    spec = b.spec
    R, d = spec.num_register_tokens, spec.embed_dim
    with torch.no_grad():
        ref = official_forward(sd, x, spec)
    h, w = x.shape[-2] // 14, x.shape[-1] // 14
    n = h * w
    assert ref["x_prenorm"].shape[1] == 1 + R + n
    tok = b.features(x, which="tokens", with_cls_attn=True)
    assert tok.dims == (h, w) and tok.feats.shape == (x.shape[0], n, d)
    assert torch.equal(tok.feats, ref["x_prenorm"][:, 1 + R:])
    for i, which in enumerate("qkv"):
        out = b.features(x, which=which, with_cls_attn=True)
        assert torch.equal(out.feats, ref["qkv"][:, 1 + R:, i]), which
        assert torch.equal(out.cls_attn, tok.cls_attn)
    assert tok.cls_attn.shape == (x.shape[0], spec.num_heads, n)
    assert torch.equal(tok.cls_attn, ref["attn"][:, :, 0, 1 + R:])
    assert torch.equal(b.embed(x), ref["x_norm_clstoken"])
    with torch.no_grad():
        assert torch.equal(b.model.forward_features(x)[:, 1 + R:], ref["x_norm_patchtokens"])


@pytest.mark.parametrize("H,W", [(42, 56), (70, 28), (518 // 2 // 14 * 14, 98)])
@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_features_equal_the_official_forward(vits14, vits14_reg, arch, H, W):
    b, sd = vits14_reg if arch.endswith("_reg") else vits14
    _check_against_official(b, sd, _img(H, W, seed=H + W))


def test_swiglu_model_equals_the_official_forward():
    """ViT-g's SwiGLU FFN and its geometry rules on a small model of the same kind (64-dim heads, 4 registers,
    LayerScale): the whole ViT-g (1.1 B parameters) is too slow for a test."""
    spec = ArchSpec("tiny_g_reg", "vit", "test", 14, 128, 2, 3, "none", img_size=518, num_register_tokens=4,
                    layer_scale=True, ffn="swiglu", mask_token=True, interpolate_offset=0.0,
                    interpolate_antialias=True, release="DINOv2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_dino_vit(spec)
    assert model.blocks[0].mlp.w12.weight.shape == (2 * 344, 128)  # (int(512 * 2 / 3) + 7) // 8 * 8 = 344
    b = Backbone(spec, model, "random", None, None)
    sd = _perturbed(b)
    _check_against_official(b, sd, _img(42, 70, seed=3))


def test_batches_of_two_equal_the_official_forward(vits14_reg):
    b, sd = vits14_reg
    x = torch.cat([_img(42, 56, seed=1), _img(42, 56, seed=2)])
    _check_against_official(b, sd, x)


def test_timm_agrees_on_the_model_with_registers(vits14_reg):
    """timm's vit_small_patch14_reg4_dinov2 (official keys through its checkpoint filter, which folds the CLS
    position into the CLS token; eager attention) gives the same normed tokens bit for bit."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    b, sd = vits14_reg
    tm = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=518, dynamic_img_size=True)
    tm.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in sd.items()}, tm), strict=True)
    tm.eval()
    for blk in tm.blocks:
        blk.attn.fused_attn = False
    x = _img(42, 70, seed=9)
    with torch.no_grad():
        theirs = tm.forward_features(x)
        ours = b.model.forward_features(x)
    assert theirs.shape == ours.shape == (1, 5 + 15, 384)
    assert torch.equal(theirs[:, 5:], ours[:, 5:]) and torch.equal(theirs[:, 0], ours[:, 0])


# ----------------------------------------------------------------------------------------- registers
def test_registers_are_not_in_the_grid(vits14_reg):
    b, sd = vits14_reg
    m = b.model
    x = _img(56, 42, seed=4)
    full = {}
    hook = m.blocks[-1].attn.qkv.register_forward_hook(lambda mod, a, out: full.__setitem__("qkv", out.clone()))
    try:
        out = b.features(x, which="k", with_cls_attn=True)
    finally:
        hook.remove()
    assert full["qkv"].shape[1] == 1 + 4 + 12 and out.feats.shape == (1, 12, 384) and out.dims == (4, 3)
    assert torch.equal(out.feats[0], full["qkv"][0, 5:, 384:768])
    # the softmax runs over CLS, registers and patches: the patch columns sum to less than 1
    assert (out.cls_attn.sum(-1) < 1).all() and (out.cls_attn > 0).all()
    # the registers take part in the attention: other register values give other patch keys
    with torch.no_grad():
        m.register_tokens.add_(1.0)
    try:
        assert not torch.equal(b.features(x).feats, out.feats)
    finally:
        with torch.no_grad():
            m.register_tokens.copy_(sd["register_tokens"])


# ----------------------------------------------------------------------------------------- miners and the stage
def test_every_miner_runs_on_a_dinov2_backbone(vits14_reg):
    from pipeline.data import build_dataset
    from pipeline.discovery import MINERS, boxes_of, build_miner

    b, _ = vits14_reg
    ds = build_dataset("voc07", str(ROOT / "tests" / "data" / "voc07-mini"), max_images=1)
    from pipeline.data import load_image
    from pipeline.data.preprocess import preprocess_image

    img = load_image(ds.records[0].path)[:150, :200]  # 150 x 200: neither side a multiple of 14 (padded)
    t, size = preprocess_image(img, 14)
    assert t.shape[-2:] == (154, 210) and size == (150, 200)
    for name in sorted(MINERS):
        miner = build_miner(name, b.patch_size)
        miner.check_backbone(b.num_heads)
        out = b.features(t[None], which="k", with_cls_attn=miner.needs.cls_attn)
        result = miner(out, size)
        boxes = boxes_of(result)
        assert boxes, name
        for mb in boxes:
            x1, y1, x2, y2 = mb.box
            assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150 and x1 % 14 == 0 and y1 % 14 == 0, (name, mb.box)
            assert mb.mask is not None and mb.mask.shape == (11, 15)


def test_mine_stage_lost_on_voc07_mini(tmp_path, voc07_mini):
    """The issue's done-when command, small: boxes, masks, scores and pictures."""
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", "dataset=voc07", f"paths.data_root={voc07_mini}",
                               "backbone=dinov2_vits14_reg", "backbone.init=random", "miner=lost",
                               "dataset.max_images=2", "num_workers=0", "progress=false"])
    metrics = run(cfg)
    stage = tmp_path / "voc07" / "dinov2_vits14_reg" / "mine"
    data = json.loads((stage / "pseudo_boxes.json").read_text())
    assert len(data["images"]) == 2 and len(data["annotations"]) == 2
    assert data["info"]["backbone"]["arch"] == "dinov2_vits14_reg" and data["info"]["backbone"]["patch_size"] == 14
    assert data["info"]["random_init"] is True
    for a in data["annotations"]:
        assert a["bbox"][0] % 14 == 0 and a["bbox"][1] % 14 == 0 and a["segmentation"]["counts"] and a["area"] > 0
        assert 0 <= a["score"] and a["rank"] == 0
    assert metrics["images"] == 2 and metrics["failures"] == 0 and metrics["corloc_total"] == 2
    assert len(list((stage / "viz").glob("*.png"))) == 2 and (stage / "contact_sheet.png").is_file()


def test_mine_stage_maskcut_square_not_a_multiple_of_14(tmp_path, voc07_mini):
    """MaskCut's ``image_size`` square (100 px: padded to 112, an 8 x 8 grid) on DINOv2 without registers: boxes
    mapped back to the original pixels, masks at the original size."""
    from pipeline.masks import decode_rle
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", "dataset=voc07", f"paths.data_root={voc07_mini}",
                               "backbone=dinov2_vits14", "backbone.init=random", "miner=maskcut",
                               "miner.image_size=100", "dataset.max_images=1", "num_workers=0", "progress=false"])
    metrics = run(cfg)
    stage = tmp_path / "voc07" / "dinov2_vits14" / "mine_maskcut"
    data = json.loads((stage / "pseudo_boxes.json").read_text())
    im = data["images"][0]
    assert metrics["failures"] == 0 and data["annotations"]
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert decode_rle(a["segmentation"]).shape == (im["height"], im["width"])
