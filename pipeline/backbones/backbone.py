"""The Backbone object: build (random or pretrained), patch features, CLS attention, embeddings."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.artifacts import sha256_file
from pipeline.backbones.precision import check_precision, forward_context
from pipeline.backbones.resnet import build_dino_resnet50, resnet_layer4
from pipeline.backbones.specs import ArchSpec, get_spec
from pipeline.backbones.vit import build_dino_vit
from pipeline.backbones.weights import load_weights, resolve_weights

FEATURES = ("k", "q", "v", "tokens", "normed")
INITS = ("pretrained", "random")


@dataclass
class FeatureOutput:
    """Patch features of a batch: ``feats`` (B, h*w, D) float32, row-major patches, CLS (and DINOv2's
    registers) dropped; ``dims`` = (h, w); ``cls_attn`` (B, heads, h*w): last block's CLS->patch attention
    (softmax over all tokens incl. CLS and registers, the patch columns kept) or None."""

    feats: Tensor
    dims: tuple[int, int]
    cls_attn: Tensor | None = None


class Backbone:
    """A DINO backbone in eval mode plus what stages stamp into artifacts (``describe()``)."""

    def __init__(self, spec: ArchSpec, model: torch.nn.Module, init: str,
                 weights_path: str | None, weights_sha256: str | None, device: str = "cpu",
                 precision: str = "fp32", force_precision: bool = False, compile: bool = False):
        self.spec = spec
        self.arch = spec.arch
        self.patch_size = spec.patch_size
        self.embed_dim = spec.embed_dim
        self.num_heads = spec.num_heads
        #: tokens before the patch grid (CLS + registers): dropped from every feature and attention row
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.init = init
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.precision = check_precision(precision, self.device, force=force_precision)
        self.compiled = False
        self._qkv: Tensor | None = None
        if spec.family == "vit":  # one hook for the lifetime of the backbone
            self._hook = self.model.blocks[-1].attn.qkv.register_forward_hook(self._keep_qkv)
        if compile:
            self._compile()

    def _compile(self) -> None:
        """``torch.compile`` the blocks before the last one (ViT) or the ResNet stages, in place.

        Opt-in and not exact: a compiled graph may fuse and reorder float operations, so features,
        seeds and boxes are reported as agreement with fp32 eager (like bf16); every new input shape
        compiles again (VOC has many image sizes: expect a compile per new size). The last ViT block is
        left eager, so the qkv forward hook keeps firing."""
        if not hasattr(torch, "compile"):
            raise ValueError("compile=true needs torch.compile (PyTorch >= 2.0)")
        if self.spec.family == "vit":
            for blk in self.model.blocks[:-1]:
                blk.compile(dynamic=False)
        else:
            for name in ("layer1", "layer2", "layer3", "layer4"):
                getattr(self.model, name).compile(dynamic=False)
        self.compiled = True

    def _keep_qkv(self, module, inputs, output) -> None:
        self._qkv = output

    def __repr__(self) -> str:
        return f"Backbone({self.arch}, init={self.init}, weights={self.weights_path})"

    def describe(self) -> dict:
        d = {"arch": self.arch, "init": self.init, "weights_path": self.weights_path,
             "weights_sha256": self.weights_sha256, "patch_size": self.patch_size}
        if self.precision != "fp32" or self.compiled:  # the exact default keeps its old description
            d.update(precision=self.precision, compiled=self.compiled)
        return d

    @property
    def exact(self) -> bool:
        """True for the exact path: float32 eager (no autocast, no torch.compile)."""
        return self.precision == "fp32" and not self.compiled

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
        """Last-block keys/queries/values (heads concatenated), output tokens (``tokens``: before the final
        norm) or normed output tokens (``normed``: after it, DINOv2's ``x_norm_patchtokens``), CLS and registers
        dropped."""
        if which not in FEATURES:
            raise ValueError(f"unknown feature {which!r}; choose one of {FEATURES}")
        img, dims = self._check(img)
        with forward_context(self.precision, self.device):
            if self.spec.family == "resnet":
                return self._resnet_features(img, dims, which, with_cls_attn)
            return self._vit_features(img, dims, which, with_cls_attn)

    def _vit_features(self, img: Tensor, dims, which: str, with_cls_attn: bool) -> FeatureOutput:
        m, skip = self.model, self.num_prefix_tokens
        fused = self.precision != "fp32"  # reduced precision: PyTorch's fused SDPA attention
        saved = [blk.attn.fused_attn for blk in m.blocks]
        self._qkv = None
        try:
            if fused:
                for blk in m.blocks:
                    blk.attn.fused_attn = True
            x = m.prepare_tokens(img)
            if which in ("tokens", "normed"):
                for blk in m.blocks:
                    x = blk(x)
                feats = (m.norm(x) if which == "normed" else x)[:, skip:]
            else:  # k/q/v only need the last block's qkv: stop there
                for blk in m.blocks[:-1]:
                    x = blk(x)
                last = m.blocks[-1]
                last.attn.qkv(last.norm1(x))
            qkv = self._qkv
        finally:
            self._qkv = None
            for blk, f in zip(m.blocks, saved):
                blk.attn.fused_attn = f
        if qkv is None:
            raise RuntimeError(f"{self.arch}: the qkv hook did not fire (was the model's last block replaced?)")
        b, n1, _ = qkv.shape
        heads, d = self.num_heads, self.embed_dim
        qkv = qkv.reshape(b, n1, 3, heads, d // heads)
        if which in ("k", "q", "v"):
            feats = qkv[:, skip:, "qkv".index(which)].reshape(b, n1 - skip, d)
        cls_attn = self._cls_attention(qkv) if with_cls_attn else None
        return FeatureOutput(feats.float().contiguous(), dims, cls_attn)

    # ------------------------------------------------------------------ batches
    @torch.no_grad()
    def features_batch(self, images: list[Tensor], which: str = "k", with_cls_attn: bool = False, *,
                       max_batch: int = 16, exact: bool | None = None) -> list[FeatureOutput]:
        """Features of several images: one :class:`FeatureOutput` (batch of 1) per image, in order.

        ``images``: (3, H, W) tensors already padded to a multiple of the patch size (as
        ``preprocess_image`` gives them); sizes may differ. Images are grouped by size (no
        cross-image padding is ever added), in chunks of at most ``max_batch``.

        ``exact`` (default: True on CPU with the exact fp32 path, False otherwise): True gives
        outputs bit-identical (``torch.equal``) to ``features(img[None])`` one by one; on a CPU this
        runs each image as its own forward, because a batched forward is *not* bit-identical there in
        general: a Linear on (B, N, D) is one GEMM with B*N rows and the BLAS picks its kernel by shape
        (measured with torch 2.14 / AVX2: differences of ~1e-6 for images of <= 9 tokens with 2 threads,
        <= 3 with 1 thread; oneDNN also picks a different convolution for a ResNet batch of small images).
        False runs one forward per group (the fast path on a GPU; agreement with fp32 single-image
        outputs is reported, not guaranteed bit-wise: the GPU's GEMM kernels also depend on shape).
        """
        if which not in FEATURES:
            raise ValueError(f"unknown feature {which!r}; choose one of {FEATURES}")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.ndim != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"features_batch: image {i} must be a (3, H, W) tensor, got {shape}")
        if exact is None:
            exact = self.device.type == "cpu" and self.exact
        out: list[FeatureOutput | None] = [None] * len(images)
        if exact:
            for i, img in enumerate(images):
                out[i] = self.features(img[None], which=which, with_cls_attn=with_cls_attn)
            return out  # type: ignore[return-value]
        for idx in group_by_size(images, int(max_batch)):
            res = self.features(torch.stack([images[i] for i in idx]), which=which, with_cls_attn=with_cls_attn)
            for j, i in enumerate(idx):
                out[i] = FeatureOutput(res.feats[j:j + 1], res.dims,
                                       None if res.cls_attn is None else res.cls_attn[j:j + 1])
        return out  # type: ignore[return-value]

    def _cls_attention(self, qkv: Tensor) -> Tensor:
        """DINO's attention ``softmax((q k^T) * scale)``, row of CLS, patch columns (the registers' columns
        dropped: the softmax is over every token, as in the model).

        The full (N+1) x (N+1) product is formed, as DINO does, so the CLS row is bit-identical to
        ``get_last_selfattention()[:, :, 0, 1:]`` (a 1-row product can round differently); for DINOv2 to
        row 0 of its ``Attention``'s ``softmax((q * scale) @ k^T)`` (scale 1/8: the same bits).
        """
        q = qkv[:, :, 0].transpose(1, 2)          # (B, heads, N+1, hd)
        k = qkv[:, :, 1].transpose(1, 2)
        scale = q.shape[-1] ** -0.5
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, heads, N+1, N+1)
        return attn[:, :, 0, self.num_prefix_tokens:].float().contiguous()

    def _resnet_features(self, img: Tensor, dims, which: str, with_cls_attn: bool) -> FeatureOutput:
        if with_cls_attn:
            raise ValueError(f"dinoseg needs a ViT backbone: {self.arch} has no CLS attention "
                             "(use arch=dino_vits16 or another dino_vit* / dinov2_vit*)")
        if which in ("q", "v", "normed"):
            raise ValueError(f"{self.arch} has no queries/values/normed tokens; use feature 'k' or 'tokens' (layer4 "
                             "output)")
        fmap = resnet_layer4(self.model, img)
        if tuple(fmap.shape[-2:]) != dims:
            raise RuntimeError(f"{self.arch}: layer4 map {tuple(fmap.shape[-2:])} != expected grid {dims}")
        feats = fmap.flatten(2).transpose(1, 2)   # (B, h*w, 2048), row-major
        return FeatureOutput(feats.float().contiguous(), dims, None)

    # ------------------------------------------------------------------ global embedding
    @torch.no_grad()
    def embed(self, img: Tensor) -> Tensor:
        """(B, D): final CLS token after the last norm (ViT; DINOv2's ``x_norm_clstoken``); layer4 global
        average pool (ResNet)."""
        img, _ = self._check(img)
        with forward_context(self.precision, self.device):
            if self.spec.family == "resnet":
                return resnet_layer4(self.model, img).mean(dim=(2, 3)).float()
            try:
                out = self.model.forward_features(img)[:, 0]
            finally:
                self._qkv = None
        return out.float()


def group_by_size(images: list[Tensor], max_batch: int) -> list[list[int]]:
    """Indices of ``images`` grouped by (H, W), groups in order of first appearance, each cut into
    chunks of at most ``max_batch`` (so a batch never needs cross-image padding)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    return [idx[k:k + max_batch] for idx in groups.values() for k in range(0, len(idx), max_batch)]


def build_backbone(arch: str, *, init: str = "pretrained", weights: str | os.PathLike | None = None,
                   weights_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   seed: int = 0, device: str = "cpu", precision: str = "fp32",
                   force_precision: bool = False, compile: bool = False) -> Backbone:
    """Build ``arch`` with seeded random init or its official weights (file, weights dir, cache, download).

    ``init="random"`` touches no file (``weights``/``weights_dir``/``cache_dir`` are ignored) and is
    stamped as such by :meth:`Backbone.describe`. ``precision`` ("fp32" default and exact, or opt-in
    "bf16"/"fp16", see :mod:`pipeline.backbones.precision`) and ``compile`` (torch.compile, not exact)
    are checked before anything is built; ``force_precision`` runs bf16 on a CPU without bf16 units.
    """
    spec = get_spec(arch)
    check_precision(precision, device, force=force_precision)  # fail before the (slow) build
    if init not in INITS:
        raise ValueError(f"unknown backbone init {init!r}; choose one of {INITS} (init=...)")
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG state
        torch.manual_seed(int(seed))
        if spec.family == "vit":  # the random init is slow and pointless when weights replace it
            model = build_dino_vit(spec, init_weights=init == "random")
        else:
            model = build_dino_resnet50()
    path = sha = None
    if init == "pretrained":
        path = resolve_weights(spec, weights, weights_dir, cache_dir)
        load_weights(model, spec, path)
        sha = sha256_file(path)
    return Backbone(spec, model, init, str(path) if path is not None else None, sha, device,
                    precision=precision, force_precision=force_precision, compile=compile)
