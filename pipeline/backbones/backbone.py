"""The Backbone object: build (random or pretrained), patch features, CLS attention, embeddings."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.artifacts import sha256_file
from pipeline.backbones.resnet import build_dino_resnet50, resnet_layer4
from pipeline.backbones.specs import ArchSpec, get_spec
from pipeline.backbones.vit import build_dino_vit
from pipeline.backbones.weights import load_weights, resolve_weights

FEATURES = ("k", "q", "v", "tokens")
INITS = ("pretrained", "random")


@dataclass
class FeatureOutput:
    """Patch features of a batch: ``feats`` (B, h*w, D) float32, row-major patches, CLS dropped;
    ``dims`` = (h, w); ``cls_attn`` (B, heads, h*w): last block's CLS->patch attention (softmax over
    all tokens incl. CLS) or None."""

    feats: Tensor
    dims: tuple[int, int]
    cls_attn: Tensor | None = None


class Backbone:
    """A DINO backbone in eval mode plus what stages stamp into artifacts (``describe()``)."""

    def __init__(self, spec: ArchSpec, model: torch.nn.Module, init: str,
                 weights_path: str | None, weights_sha256: str | None, device: str = "cpu"):
        self.spec = spec
        self.arch = spec.arch
        self.patch_size = spec.patch_size
        self.embed_dim = spec.embed_dim
        self.num_heads = spec.num_heads
        self.init = init
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self._qkv: Tensor | None = None
        if spec.family == "vit":  # one hook for the lifetime of the backbone
            self._hook = self.model.blocks[-1].attn.qkv.register_forward_hook(self._keep_qkv)

    def _keep_qkv(self, module, inputs, output) -> None:
        self._qkv = output

    def __repr__(self) -> str:
        return f"Backbone({self.arch}, init={self.init}, weights={self.weights_path})"

    def describe(self) -> dict:
        return {"arch": self.arch, "init": self.init, "weights_path": self.weights_path,
                "weights_sha256": self.weights_sha256, "patch_size": self.patch_size}

    # ------------------------------------------------------------------ inputs
    def _check(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if not isinstance(img, Tensor) or img.ndim != 4 or img.shape[1] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"{self.arch}: expected a (B, 3, H, W) tensor, got {shape}; "
                             "use preprocess_image(...) and add a batch dim (img[None])")
        h, w = img.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"{self.arch}: image size {h}x{w} is not a multiple of the patch size {p}; "
                             "pad it with preprocess_image(img, backbone.patch_size)")
        return img.to(self.device, torch.float32), (h // p, w // p)

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def features(self, img: Tensor, which: str = "k", with_cls_attn: bool = False) -> FeatureOutput:
        """Last-block keys/queries/values (heads concatenated) or output tokens, CLS dropped."""
        if which not in FEATURES:
            raise ValueError(f"unknown feature {which!r}; choose one of {FEATURES} (backbone.feature=...)")
        img, dims = self._check(img)
        if self.spec.family == "resnet":
            return self._resnet_features(img, dims, which, with_cls_attn)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(img))))
        self._qkv = None
        try:
            if which == "tokens":
                for blk in m.blocks:
                    x = blk(x)
                feats = x[:, 1:]
            else:  # k/q/v only need the last block's qkv: stop there
                for blk in m.blocks[:-1]:
                    x = blk(x)
                last = m.blocks[-1]
                last.attn.qkv(last.norm1(x))
            qkv = self._qkv
        finally:
            self._qkv = None
        if qkv is None:
            raise RuntimeError(f"{self.arch}: the qkv hook did not fire (unsupported timm version?)")
        b, n1, _ = qkv.shape
        heads, d = self.num_heads, self.embed_dim
        qkv = qkv.reshape(b, n1, 3, heads, d // heads)
        if which != "tokens":
            feats = qkv[:, 1:, "qkv".index(which)].reshape(b, n1 - 1, d)
        cls_attn = self._cls_attention(qkv) if with_cls_attn else None
        return FeatureOutput(feats.float().contiguous(), dims, cls_attn)

    def _cls_attention(self, qkv: Tensor) -> Tensor:
        """DINO's attention ``softmax((q k^T) * scale)``, row of CLS, patch columns.

        The full (N+1) x (N+1) product is formed, as DINO does, so the CLS row is bit-identical to
        ``get_last_selfattention()[:, :, 0, 1:]`` (a 1-row product can round differently).
        """
        q = qkv[:, :, 0].transpose(1, 2)          # (B, heads, N+1, hd)
        k = qkv[:, :, 1].transpose(1, 2)
        scale = q.shape[-1] ** -0.5
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, heads, N+1, N+1)
        return attn[:, :, 0, 1:].float().contiguous()

    def _resnet_features(self, img: Tensor, dims, which: str, with_cls_attn: bool) -> FeatureOutput:
        if with_cls_attn:
            raise ValueError(f"dinoseg needs a ViT backbone: {self.arch} has no CLS attention "
                             "(use backbone=dino_vits16 or another dino_vit*)")
        if which in ("q", "v"):
            raise ValueError(f"{self.arch} has no queries/values; use feature 'k' or 'tokens' (layer4 output)")
        fmap = resnet_layer4(self.model, img)
        if tuple(fmap.shape[-2:]) != dims:
            raise RuntimeError(f"{self.arch}: layer4 map {tuple(fmap.shape[-2:])} != expected grid {dims}")
        feats = fmap.flatten(2).transpose(1, 2)   # (B, h*w, 2048), row-major
        return FeatureOutput(feats.float().contiguous(), dims, None)

    # ------------------------------------------------------------------ global embedding
    @torch.no_grad()
    def embed(self, img: Tensor) -> Tensor:
        """(B, D): final CLS token after the last norm (ViT); layer4 global average pool (ResNet)."""
        img, _ = self._check(img)
        if self.spec.family == "resnet":
            return resnet_layer4(self.model, img).mean(dim=(2, 3)).float()
        try:
            out = self.model.forward_features(img)[:, 0]
        finally:
            self._qkv = None
        return out.float()


def build_backbone(arch: str, *, init: str = "pretrained", weights: str | os.PathLike | None = None,
                   weights_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   seed: int = 0, device: str = "cpu") -> Backbone:
    """Build ``arch`` with seeded random init or DINO weights (file, weights dir, cache, download).

    ``init="random"`` touches no file (``weights``/``weights_dir``/``cache_dir`` are ignored) and is
    stamped as such by :meth:`Backbone.describe`.
    """
    spec = get_spec(arch)
    if init not in INITS:
        raise ValueError(f"unknown backbone init {init!r}; choose one of {INITS} (backbone.init=...)")
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG state
        torch.manual_seed(int(seed))
        if spec.family == "vit":  # timm's init is slow and pointless when weights replace it
            model = build_dino_vit(spec, init_weights=init == "random")
        else:
            model = build_dino_resnet50()
    path = sha = None
    if init == "pretrained":
        path = resolve_weights(spec, weights, weights_dir, cache_dir)
        load_weights(model, spec, path)
        sha = sha256_file(path)
    return Backbone(spec, model, init, str(path) if path is not None else None, sha, device)
