"""One interface for every object-discovery method ("miner").

A miner is built once from its parameters (validated then, not per image) by :func:`build_miner`. It
declares what it needs from the backbone (:class:`Needs`) and maps the features of ONE image and its
unpadded size to a result whose ``boxes`` (rank order, rank 0 first) and ``scores`` go into the
pseudo-box file; the rest of the result (seed, masks, eigenvectors...) is for pictures.

Adding a miner: a module with the algorithm (features in, result out, no I/O), a subclass of
:class:`Miner` registered in :data:`MINERS` below, ``conf/miner/<name>.yaml`` (only its ``name`` and the
schema it starts from: the parameters and their defaults are the algorithm's keyword arguments, turned into
the config schema by :meth:`Miner.params_dataclass`), and tests. Nothing else names an algorithm.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import numpy as np

from pipeline.discovery.dinoseg import dinoseg
from pipeline.discovery.found import NONE as FOUND_NO_HEAD
from pipeline.discovery.found import SHIPPED, check_found_params, check_head_width, found, load_head
from pipeline.discovery.lost import check_positive_int, lost
from pipeline.discovery.cut_solver import check_solver
from pipeline.discovery.maskcut import maskcut, maskcut_batch
from pipeline.discovery.tokencut import tokencut, tokencut_batch
from pipeline.discovery.votecut import check_votecut_params, votecut, votecut_ensemble
from pipeline.masks import CRF_PACKAGE, crf_available


@dataclass(frozen=True)
class Needs:
    """What a miner reads from the backbone: the patch features (``backbone.feature``: k, q, v or tokens)
    and/or the last block's CLS attention."""

    features: bool = True
    cls_attn: bool = False


@dataclass(frozen=True)
class MinedBox:
    box: tuple[float, float, float, float]   # xyxy pixels of the image the miner saw, x2/y2 exclusive
    score: float
    rank: int
    mask: Optional[np.ndarray] = None        # (h, w) bool patch mask of the object (its box is the mask's extent)


class Miner:
    """Base class: subclasses set ``name``, ``needs``, ``fn`` (the algorithm) and which ``fn`` argument takes
    the backbone output (``input``: "feats" or "cls_attn")."""

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs()
    input: ClassVar[str] = "feats"
    fn: ClassVar[Callable[..., Any]]
    #: a square side the image is resized to before the backbone (None: the image as it is); boxes are
    #: mapped back to the original pixels by the mining loop
    input_size: int | None = None

    def __init__(self, patch_size: int, /, **params: Any) -> None:
        check_positive_int(self.name, "patch_size", patch_size)
        allowed = self.parameters()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"miner {self.name}: unknown parameter(s) {unknown}; accepted: {sorted(allowed)}")
        self.patch_size = int(patch_size)
        self.params = {**allowed, **params}
        self.validate()
        self.input_size = self.params.pop("image_size", None)
        #: refine each object's pixel mask with a dense CRF (a mask that changes too much is dropped with its box)
        self.crf = bool(self.params.pop("crf", False))
        if self.crf and not crf_available():
            raise ValueError(f"{self.name}: crf=True needs the {CRF_PACKAGE} package (a dense CRF; it builds from "
                             f"source with a C++ compiler): pip install {CRF_PACKAGE}")

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """The algorithm's own parameters and their defaults (everything but the inputs)."""
        skip = {"feats", "cls_attn", "dims", "patch_size", "image_size"}
        sig = inspect.signature(cls.fn)
        return {k: p.default for k, p in sig.parameters.items() if k not in skip} | cls.extra_parameters

    #: parameters the miner handles itself (not passed to ``fn``), with their defaults and types; every miner
    #: takes ``crf`` (dense-CRF refinement of its masks, off: the masks are the patch masks)
    extra_parameters: ClassVar[dict[str, Any]] = {"crf": False}
    extra_types: ClassVar[dict[str, Any]] = {"crf": bool}

    @classmethod
    def params_dataclass(cls) -> type:
        """The miner's parameters as a dataclass: ``name`` and each parameter, typed, with its default. The
        config schema of ``miner=<name>`` is this class, so every default lives in one place: the algorithm's
        signature (or ``extra_parameters``)."""
        hints = typing.get_type_hints(cls.fn)
        fields = [("name", str, dataclasses.field(default=cls.name))]
        for key, default in cls.parameters().items():
            fields.append((key, cls.extra_types.get(key) or hints.get(key, type(default)),
                           dataclasses.field(default=default)))
        return dataclasses.make_dataclass(f"{cls.__name__}Params", fields)

    #: parameters added after runs were recorded, with the value those runs had: left out of a run's identity
    #: at that value, so the earlier runs stay "up to date" (:meth:`recorded`)
    unrecorded_defaults: ClassVar[dict[str, Any]] = {"crf": False, "solver": "scipy"}

    @classmethod
    def recorded(cls, params: dict) -> dict:
        """``params`` as a run records them (what decides its boxes): without the parameters still at the value
        runs had before those parameters existed (:attr:`unrecorded_defaults`), with what the miner ``params``
        names adds (:meth:`identity`)."""
        own = MINERS.get(params.get("name"), cls)
        return {k: v for k, v in params.items()
                if not (k in cls.unrecorded_defaults and v == cls.unrecorded_defaults[k])} | own.identity(params)

    @classmethod
    def identity(cls, params: dict) -> dict:
        """What decides the boxes beyond the parameters' values (e.g. the content of a file a parameter names)."""
        return {}

    def validate(self) -> None:
        """Check the parameters once (raise ValueError naming the parameter)."""

    def check_backbone(self, num_heads: int, embed_dim: int | None = None, feature: str | None = None) -> None:
        """Check the parameters against the backbone before any image is read (raise ValueError naming the
        parameter); ``num_heads``: attention heads of its last block (0 for a CNN); ``embed_dim``: the width
        of its features and ``feature`` which ones the miner gets (k, q, v, tokens), when known."""

    def __call__(self, output, image_size, index: int = 0):
        """Mine image ``index`` of a backbone :class:`~pipeline.backbones.FeatureOutput`."""
        if self.input == "cls_attn":
            data = getattr(output, "cls_attn", None)
            if data is None:
                raise ValueError(f"miner '{self.name}' needs the CLS attention of the last block, but the backbone "
                                 "returned none (cls_attn is None); use a DINO ViT backbone and ask it for CLS "
                                 "attention, or use the lost miner")
        else:
            data = output.feats
        return type(self).fn(data[index], output.dims, patch_size=self.patch_size, image_size=image_size,
                             **self.params)

    def mine_batch(self, outputs, image_sizes) -> list:
        """Several images: ``outputs[i]`` is image i's FeatureOutput (a batch of one, as
        ``Backbone.features_batch`` returns them), ``image_sizes[i]`` its unpadded (H, W). Results in input
        order, each identical to ``self(outputs[i], image_sizes[i])``; miners with batched math override it."""
        if len(outputs) != len(image_sizes):
            raise ValueError(f"{self.name}: {len(outputs)} feature outputs but {len(image_sizes)} image sizes")
        return [self(o, s) for o, s in zip(outputs, image_sizes)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


def boxes_of(result) -> list[MinedBox]:
    """The ranked boxes of any miner result with their patch masks: ``result.boxes``/``scores``/``masks`` when
    it has several, else its ``box``/``score``/``mask``."""
    boxes = getattr(result, "boxes", None)
    if boxes is None:
        boxes, scores, masks = [result.box], [result.score], [getattr(result, "mask", None)]
    else:
        scores, masks = result.scores, getattr(result, "masks", None) or [None] * len(boxes)
    return [MinedBox(tuple(float(v) for v in np.asarray(b, dtype=np.float64).reshape(4)), float(s), r, m)
            for r, (b, s, m) in enumerate(zip(boxes, scores, masks))]


# ---------------------------------------------------------------------------------------------- registry
class LostMiner(Miner):
    name = "lost"
    fn = staticmethod(lost)

    def validate(self) -> None:
        check_positive_int("lost", "k_patches", self.params["k_patches"])

    def mine_batch(self, outputs, image_sizes) -> list:
        """Same-size images share one device pass (:func:`pipeline.discovery.batched.lost_batch`: the same
        float operations as :func:`lost` on the same shapes, so the same results)."""
        from pipeline.discovery.batched import lost_batch

        return _mine_grouped(self, lost_batch, outputs, image_sizes, k_patches=self.params["k_patches"])


class DinoSegMiner(Miner):
    name = "dinoseg"
    needs = Needs(features=False, cls_attn=True)
    input = "cls_attn"
    fn = staticmethod(dinoseg)

    def validate(self) -> None:
        head = self.params["head"]
        if isinstance(head, bool) or int(head) != head or head < 0:
            raise ValueError(f"dinoseg: head must be a head index >= 0, got {head!r}")
        if not 0 < float(self.params["mass"]) <= 1:
            raise ValueError(f"dinoseg: mass must be in (0, 1], got {self.params['mass']!r}")

    def check_backbone(self, num_heads: int, embed_dim: int | None = None, feature: str | None = None) -> None:
        if num_heads == 0:
            raise ValueError("dinoseg: needs the CLS attention of a ViT; this backbone has no attention heads")
        if self.params["head"] >= num_heads:
            raise ValueError(f"dinoseg: head must be an integer in [0, {num_heads - 1}] (the backbone has "
                             f"{num_heads} heads), got {self.params['head']!r}")


def _check_cut(miner: str, params: dict) -> None:
    if not -1 < float(params["tau"]) < 1:
        raise ValueError(f"{miner}: tau must be in (-1, 1) (a cosine similarity threshold), got {params['tau']!r}")
    if not float(params["eps"]) > 0:
        raise ValueError(f"{miner}: eps must be > 0, got {params['eps']!r}")
    check_solver(params["solver"], miner)


def _mine_grouped(miner: Miner, batch_fn: Callable[..., list], outputs, image_sizes, **params) -> list:
    """``mine_batch`` by a batched algorithm: the images of one patch grid, feature width and device are solved
    together by ``batch_fn(feats, dims, patch_size, image_sizes, **params)``; results in input order."""
    import torch

    if len(outputs) != len(image_sizes):
        raise ValueError(f"{miner.name}: {len(outputs)} feature outputs but {len(image_sizes)} image sizes")
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(outputs):
        if o.feats.shape[0] != 1:
            raise ValueError(f"{miner.name}: output {i} holds {o.feats.shape[0]} images; pass one per image")
        groups.setdefault((tuple(o.dims), tuple(o.feats.shape[1:]), o.feats.device), []).append(i)
    results: list = [None] * len(outputs)
    for idx in groups.values():
        feats = torch.cat([outputs[i].feats for i in idx])
        found = batch_fn(feats, outputs[idx[0]].dims, miner.patch_size, [image_sizes[i] for i in idx], **params)
        for i, r in zip(idx, found):
            results[i] = r
    return results


def _mine_cuts_batch(miner: Miner, batch_fn: Callable[..., list], outputs, image_sizes) -> list:
    """``mine_batch`` of the normalized-cut miners: with ``solver="torch"`` the images of one patch grid (and
    device) are solved together by ``batch_fn`` (``tokencut_batch``, ``maskcut_batch``); with the exact
    ``"scipy"`` one image at a time, as ``Miner.mine_batch``."""
    if miner.params["solver"] != "torch":
        return Miner.mine_batch(miner, outputs, image_sizes)
    return _mine_grouped(miner, batch_fn, outputs, image_sizes, **miner.params)


class TokenCutMiner(Miner):
    """TokenCut (Wang et al., CVPR 2022): normalized cut of the patch-similarity graph (one box; ``max_boxes``
    adds the next components of the bipartition). ``solver``: "scipy" (exact, default) or "torch" (fast,
    batched over same-size images on the features' device: :mod:`pipeline.discovery.cut_solver`)."""
    name = "tokencut"
    fn = staticmethod(tokencut)

    def validate(self) -> None:
        _check_cut("tokencut", self.params)
        check_positive_int("tokencut", "max_boxes", self.params["max_boxes"])

    def mine_batch(self, outputs, image_sizes) -> list:
        return _mine_cuts_batch(self, tokencut_batch, outputs, image_sizes)


class MaskCutMiner(Miner):
    """MaskCut (CutLER, Wang et al., CVPR 2023): up to ``num_objects`` repeated normalized cuts, several boxes.
    ``image_size`` (optional) resizes the image to that square first, as MaskCut does (480). ``solver`` as
    TokenCut's ("torch": every image's stage ``t`` solved in one batch)."""
    name = "maskcut"
    fn = staticmethod(maskcut)
    extra_parameters = {**Miner.extra_parameters, "image_size": None}
    extra_types = {**Miner.extra_types, "image_size": Optional[int]}

    def validate(self) -> None:
        _check_cut("maskcut", self.params)
        check_positive_int("maskcut", "num_objects", self.params["num_objects"])
        size = self.params["image_size"]
        if size is not None:
            check_positive_int("maskcut", "image_size", size)
            if int(size) < self.patch_size:
                raise ValueError(f"maskcut: image_size={size} is smaller than one patch ({self.patch_size})")

    def mine_batch(self, outputs, image_sizes) -> list:
        return _mine_cuts_batch(self, maskcut_batch, outputs, image_sizes)


class FoundMiner(Miner):
    """FOUND (Siméoni et al., CVPR 2023): the background seed from the head-weighted CLS attention and the
    authors' trained 1x1 head on the keys (``head``: "shipped", a head file, or "none" for the seed alone);
    ``mode`` "single" (the largest component) or "multi" (every component, ranked). Needs the keys and the
    CLS attention of every head. The head file is read once, here."""
    name = "found"
    needs = Needs(features=True, cls_attn=True)
    fn = staticmethod(found)

    def validate(self) -> None:
        check_found_params(self.params["bkg_th"], self.params["mode"])
        self.head = load_head(self.params["head"])

    @classmethod
    def identity(cls, params: dict) -> dict:
        """A head file of the user's is identified by its content too (a head retrained at the same path makes other
        boxes); the shipped head and ``none`` by their names."""
        from pipeline.artifacts import sha256_file

        head = params.get("head")
        path = None if head in (None, SHIPPED, FOUND_NO_HEAD) else os.path.expanduser(str(head))
        return {"head_sha256": sha256_file(path)} if path and os.path.isfile(path) else {}

    def check_backbone(self, num_heads: int, embed_dim: int | None = None, feature: str | None = None) -> None:
        if num_heads == 0:
            raise ValueError("found: needs the CLS attention of a ViT (its sparsity-weighted heads give the "
                             "background seed); this backbone has no attention heads: use a dino_vit* backbone")
        if embed_dim is not None:
            check_head_width(self.head, embed_dim)
        if feature is None:
            return
        if self.head is not None and feature != "k":
            raise ValueError(f"found: the head ({self.params['head']}) was trained on keys, but the backbone gives "
                             f"feature={feature}; use feature=k, or head={FOUND_NO_HEAD} (the background seed alone "
                             "also works on q or v)")
        if feature == "tokens":
            raise ValueError("found: the background seed weights each attention head's slice of k, q or v; "
                             "feature=tokens has no heads: use k, q or v")

    def __call__(self, output, image_size, index: int = 0):
        if getattr(output, "cls_attn", None) is None:
            raise ValueError("miner 'found' needs the CLS attention of the last block, but the backbone returned "
                             "none (cls_attn is None); use a DINO ViT backbone and ask it for CLS attention "
                             "(with_cls_attn=miner.needs.cls_attn)")
        p = self.params
        return found(output.feats[index], output.cls_attn[index], output.dims, patch_size=self.patch_size,
                     image_size=image_size, head=self.head, bkg_th=p["bkg_th"], mode=p["mode"])


class VoteCutMiner(Miner):
    """VoteCut (CuVLER, Arica et al., CVPR 2024): k-means of the normalized cut's eigenvectors, instance masks
    voted by IoU into objects, each scored by its cluster's size over the largest's (the soft targets of
    ``score_weighting``). ``image_size`` (480) resizes the image to that square first, as the reference.
    ``backbones``: the reference's ensemble (e.g. ``[dino_vits8, dinov2_vitb14:normed]``, as
    :func:`pipeline.backbones.ensemble.parse_members`), whose features come together in an
    :class:`~pipeline.backbones.ensemble.EnsembleOutput` (a :class:`~pipeline.backbones.ensemble.BackboneEnsemble`
    gives them); null: the one configured backbone."""
    name = "votecut"
    fn = staticmethod(votecut)
    extra_parameters = {**Miner.extra_parameters, "image_size": 480, "backbones": None}
    extra_types = {**Miner.extra_types, "image_size": Optional[int], "backbones": Optional[list[str]]}

    def validate(self) -> None:
        from pipeline.backbones.ensemble import parse_members

        p = self.params
        check_votecut_params(p["tau"], p["eps"], p["num_eigenvectors"], p["ks"], p["tau_m"], p["iou_threshold"],
                             p["max_objects"], p["min_size"])
        p["ks"] = tuple(int(k) for k in p["ks"])
        size = p["image_size"]
        if size is not None:
            check_positive_int("votecut", "image_size", size)
            if int(size) < self.patch_size:
                raise ValueError(f"votecut: image_size={size} is smaller than one patch ({self.patch_size})")
        backbones = p.pop("backbones")
        #: the ensemble's members (None: one backbone)
        self.members = parse_members(list(backbones), "votecut: backbones") if backbones else None
        if self.members and size is None:
            raise ValueError("votecut: backbones (an ensemble) needs image_size: every backbone sees the image "
                             "resized to that square (the reference: 480)")

    def __call__(self, output, image_size, index: int = 0):
        groups = getattr(output, "members", None)
        if groups is None and self.members:
            raise ValueError(f"votecut: backbones={[m.arch for m in self.members]} needs the features of each "
                             "(an EnsembleOutput, as BackboneEnsemble.features_batch gives them); got one backbone's")
        if groups is None:
            return super().__call__(output, image_size, index)
        return votecut_ensemble([(g.feats[index], g.dims) for g in groups], self.patch_size, image_size,
                                finest=output.finest, **self.params)


MINERS: dict[str, type[Miner]] = {m.name: m for m in (LostMiner, DinoSegMiner, TokenCutMiner, MaskCutMiner,
                                                      FoundMiner, VoteCutMiner)}


def build_miner(name: str, patch_size: int, /, **params: Any) -> Miner:
    """The miner ``name`` with its parameters checked once; ``params`` may hold a ``name`` equal to ``name``
    (so a whole miner config can be splatted in)."""
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known miners: {sorted(MINERS)}")
    params = dict(params)
    other = params.pop("name", name)
    if other != name:
        raise ValueError(f"build_miner: params name {other!r} disagrees with miner {name!r}")
    return MINERS[name](patch_size, **params)
