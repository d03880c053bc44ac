"""Backbone ensembles: several backbones that see the same image, each once (VoteCut's ``miner.backbones``).

CuVLER's VoteCut (Arica et al., CVPR 2024; shahaf-arica/CuVLER, MIT) votes over the normalized cuts of six
self-supervised ViTs (its ``extract_eig_vecs.py``: DINO ViT-S/16, B/16, S/8, B/8 on their keys, DINOv2 ViT-S/14 and
B/14 on their normed patch tokens). Here every member sees the image resized to its own square: the ensemble's
``image_size`` floored to a multiple of its patch (480 for patch 8 and 16, 476 = 34 x 14 for DINOv2: the reference's
480 x 480 and 476 x 476 inputs) and gives its patch features, once per image (``Member.feature``, else the
configured feature: ``dinov2_vitb14:normed`` asks for the normed tokens the reference uses for DINOv2).

To the mining loop the ensemble is one backbone: its ``patch_size`` and grid are those of the finest member (the
largest grid; the first on ties): the image is padded to that patch, the miner votes on that grid (the reference's
60 x 60 of the ViT/8 models at 480 px) and the mining loop maps masks to pixels with that patch.

Where this differs from the reference: the mining loader resizes the image to ``image_size`` (bicubic, as every miner)
and the members whose patch does not divide it get that tensor resized again (bicubic, antialiased) to their side;
the reference resizes the original image with PIL's Lanczos to each size.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.backbones.backbone import FEATURES, FeatureOutput


@dataclass(frozen=True)
class Member:
    """One backbone of an ensemble: its ``arch`` and the features it gives (None: the configured feature)."""

    arch: str
    feature: Optional[str] = None


def parse_members(specs: Sequence[str], key: str = "backbones") -> list[Member]:
    """``["dino_vits8", "dinov2_vitb14:normed", ...]`` ("arch" or "arch:feature") as :class:`Member` s; ValueError
    naming ``key`` and the bad entry (an unknown arch or feature, a repeated member)."""
    from pipeline.backbones.specs import ARCHS

    if isinstance(specs, (str, bytes)) or not len(specs):
        raise ValueError(f"{key} must be a non-empty list of backbone names (e.g. [dino_vits8, dinov2_vits14:normed]), "
                         f"got {specs!r}")
    members = []
    for spec in specs:
        arch, _, feature = str(spec).partition(":")
        if arch not in ARCHS:
            raise ValueError(f"{key} lists an unknown backbone {arch!r}; choose from {', '.join(sorted(ARCHS))}")
        if feature and feature not in FEATURES:
            raise ValueError(f"{key} gives {arch} an unknown feature {feature!r}; choose one of {', '.join(FEATURES)} "
                             "(or leave it out: the configured backbone.feature)")
        member = Member(arch, feature or None)
        if member in members:
            raise ValueError(f"{key} lists {spec!r} twice; each backbone votes once")
        members.append(member)
    return members


@dataclass
class EnsembleOutput:
    """One image's features from every member (``members[i]``: member i's :class:`FeatureOutput`, a batch of one),
    ``finest``: the member whose grid ``dims`` the miner votes on. ``feats``/``cls_attn`` are None: a miner reads
    ``members``."""

    members: list[FeatureOutput]
    finest: int
    dims: tuple[int, int]
    feats: None = field(default=None)
    cls_attn: None = field(default=None)


class BackboneEnsemble:
    """Built backbones (:class:`~pipeline.backbones.Backbone`) and what each gives (``members``, as
    :func:`parse_members`) for images resized to the square ``image_size``; see the module docstring."""

    def __init__(self, backbones: Sequence, members: Sequence[Member], image_size: int) -> None:
        if not len(backbones) or len(backbones) != len(members):
            raise ValueError(f"an ensemble needs one member per backbone, got {len(backbones)} backbones and "
                             f"{len(members)} members")
        self.backbones, self.members, self.image_size = list(backbones), list(members), int(image_size)
        too_big = [b.arch for b in self.backbones if b.patch_size > self.image_size]
        if too_big:
            raise ValueError(f"image_size={image_size} is smaller than one patch of {', '.join(too_big)}")
        grids = [self.image_size // b.patch_size for b in self.backbones]
        self.finest = grids.index(max(grids))
        self.patch_size = self.backbones[self.finest].patch_size
        self.sides = [g * b.patch_size for g, b in zip(grids, self.backbones)]
        self.device = self.backbones[0].device
        self.init = "random" if any(b.init == "random" for b in self.backbones) else "pretrained"
        self.arch = "+".join(b.arch for b in self.backbones)

    def describe(self) -> dict:
        """Each member's description (and feature), the ensemble's input size, patch and init; ``weights_sha256``
        digests the members' (None when one has none)."""
        descs = [{**b.describe(), "feature": m.feature} for b, m in zip(self.backbones, self.members)]
        shas = [d.get("weights_sha256") for d in descs]
        sha = hashlib.sha256("|".join(shas).encode()).hexdigest() if all(shas) else None
        return {"arch": self.arch, "init": self.init, "weights_sha256": sha, "patch_size": self.patch_size,
                "image_size": self.image_size, "members": descs}

    def member_input(self, image: Tensor, i: int) -> Tensor:
        """The (3, s, s) input of member ``i`` from the loader's (3, H, W) ``image`` (the ``image_size`` square,
        ImageNet-normalised, padded to the ensemble's patch): the square itself where the member's side ``s`` is
        ``image_size``, else the square resized to ``s`` (bicubic, antialiased)."""
        S, side = self.image_size, self.sides[i]
        if image.ndim != 3 or min(image.shape[-2:]) < S:
            raise ValueError(f"ensemble: expected a (3, >= {S}, >= {S}) image (the miner's image_size square), got "
                             f"{tuple(image.shape)}")
        if side == S:
            return image if tuple(image.shape[-2:]) == (S, S) else image[:, :S, :S].contiguous()
        return F.interpolate(image[None, :, :S, :S], size=(side, side), mode="bicubic", antialias=True,
                             align_corners=False)[0]

    @torch.no_grad()
    def features_batch(self, images: list[Tensor], which: str = "k", with_cls_attn: bool = False, *,
                       max_batch: int = 16, exact: bool | None = None) -> list[EnsembleOutput]:
        """One :class:`EnsembleOutput` per image: every member's ``features_batch`` of its inputs (its own feature,
        else ``which``), one pass per member over the images."""
        if with_cls_attn:
            raise ValueError("a backbone ensemble gives patch features only, no CLS attention; use one backbone "
                             "(leave miner.backbones unset) for a miner that needs it")
        per_member = [b.features_batch([self.member_input(img, i) for img in images], which=m.feature or which,
                                       max_batch=max_batch, exact=exact)
                      for i, (b, m) in enumerate(zip(self.backbones, self.members))]
        return [EnsembleOutput([outs[j] for outs in per_member], self.finest, tuple(per_member[self.finest][j].dims))
                for j in range(len(images))]


def build_ensemble(specs: Sequence[str], image_size: int, build) -> BackboneEnsemble:
    """The ensemble of ``specs`` (:func:`parse_members`) for ``image_size`` squares; ``build(arch)`` builds each
    member's backbone (as the configured one, with that arch)."""
    members = parse_members(specs)
    return BackboneEnsemble([build(m.arch) for m in members], members, image_size)
