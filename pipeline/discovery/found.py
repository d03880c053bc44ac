"""FOUND (Siméoni et al., CVPR 2023): the background seed and the trained 1x1 head, on one image.

Features in, result out; no I/O in the algorithm (:func:`load_head` reads a head file once, through
:func:`pipeline.weights.read_checkpoint`, when a miner is built). Written from the paper and checked
against the authors' reference code (valeoai/FOUND: ``bkg_seg.py`` ``compute_img_bkg_seg``, ``model.py``
``FoundModel.forward_step`` / ``get_bkg_pseudo_labels_batch``, ``evaluation/uod.py`` and ``misc.py``
``get_bbox_from_segmentation_labels``: the single-object CorLoc protocol). The same torch operations on
tensors of the same shapes and layouts as the reference, in its order, so the same bits. Inputs: the
last block's keys ``k`` (N, D), heads concatenated, CLS dropped, and its CLS attention ``A`` (nh, N)
(softmax over all tokens incl. CLS, the CLS row, patch columns), N = h * w patches row-major.

Background seed (training-free; the reference's ``compute_img_bkg_seg`` with ``apply_weights=True``):

1. Head sparsity weights (CroW-style): ``t = mean(A)`` over all heads and patches (float32 ``torch.mean``);
   ``Q_i = #{p: A_i(p) > t} / N`` per head; ``beta_i = log(sum_j (Q_j + 1e-10) / (Q_i + 1e-10))``.
2. Seed = ``argmin_p sum_i beta_i A_i(p)``, the least-attended patch (torch.argmin: the first on ties).
3. Descriptors: each head's slice of ``k`` times its ``beta_i`` (``k.reshape(N, nh, D / nh) * beta``),
   L2-normalised (``F.normalize``), cosine similarities ``S = bmm(d, dᵀ)`` (the full N x N product, as
   the reference, so the seed's row has its bits), background ``= S[seed] > bkg_th`` (0.3).

Object mask:

* ``head`` (default: the authors' head, shipped in ``found_head/``): the 1x1 convolution on the keys laid
  out as ``(1, D, h, w)`` (a permuted ``(1, h, w, D)`` tensor, as the reference feeds it),
  ``sigmoid(logits) > 0.5``, at patch resolution (no upsampling: the CorLoc protocol thresholds the
  patch-level map). The background seed is computed too, for the pictures; it does not change the boxes.
* ``head="none"``: the complement of the background mask (the reference's pseudo-label, without its
  bilateral solver).

Boxes (``get_bbox_from_segmentation_labels``): ``scipy.ndimage.label`` of the (h, w) mask (default
structure: 4-connectivity); components ranked by size, largest first, ties to the lowest label (the
reference's ``np.bincount(labels).argmax()``); box ``[xmin, ymin, xmax + 1, ymax + 1] * patch_size``,
x2/y2 clipped to the unpadded image (:func:`pipeline.discovery.lost.grid_mask_box`). ``mode="single"``:
the largest component only (FOUND's single-object protocol); ``mode="multi"``: every component in that
order (rank 0 is the single box; FOUND's UOD evaluation has no multi protocol, its saliency "multi" mode
keeps the whole mask: here the components are its objects).

Scores (ours; FOUND ranks nothing): with a head, the component's mean sigmoid (in (0.5, 1]); without,
its mean ``(1 - S[seed, p]) / 2`` (the rescaled cosine distance to the background seed, in
``[(1 - bkg_th) / 2, 1]``). 0.0 in the fallback.

Differences from the reference, where it cannot be matched or crashes:

* An empty object mask (no sigmoid above 0.5; with ``head="none"``, every patch similar to the seed): the
  reference crashes (argmax of an empty bincount); here the whole-image box ``[0, 0, W, H]``, score 0.0, an
  all-True mask and ``degenerate = True``, as the other miners' fallbacks.
* A grid of one row or one column: the reference ``squeeze()``s the map to 1-D and its box is wrong; here
  the (h, w) grid is kept.
* The reference computes on the GPU; CPU and GPU results agree except where a value sits within rounding of
  a threshold (sigmoid at 0.5, a cosine at ``bkg_th``) or two weighted attentions tie at the minimum.
* The bilateral solver (training-time pseudo-labels and an option of the saliency evaluation; not used
  by the reference's CorLoc evaluation) is not implemented.
* The head was trained on DINO ViT-S/8 keys (384 dims). Any backbone whose key width matches accepts it
  (ViT-S/16 too: that combination is not the authors'); another width is refused (use ``head="none"`` or a
  head trained for it). Only keys are the head's input (a miner on ``q``/``v``/``tokens`` is refused with a
  head; ``head="none"`` works on ``q``/``v`` as the reference's ``bkg_type_feats``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.discovery.lost import as_feats, check_grid, grid_mask_box
from pipeline.discovery.tokencut import FirstOfRanked

SHIPPED = "shipped"                 # the authors' head, in found_head/ beside this module
NONE = "none"                       # no head: the training-free background seed alone
SHIPPED_HEAD_FILE = Path(__file__).resolve().parent / "found_head" / "decoder_weights.pt"
MODES = ("single", "multi")
EPSILON = 1e-10                     # the reference's epsilon in the sparsity weights
HEAD_CHOICES = f"'{SHIPPED}' (the authors' head for DINO ViT-S/8 keys), '{NONE}' (the training-free " \
               "background seed alone) or the path of a head file"


# ------------------------------------------------------------------------------------------------- the head
@dataclass(frozen=True)
class FoundHead:
    """FOUND's trained head: a 1x1 convolution from ``in_dim`` key channels to one logit.
    ``weight`` (1, in_dim, 1, 1) and ``bias`` (1,) float32 on the CPU; ``source``: "shipped" or the file."""

    weight: torch.Tensor
    bias: torch.Tensor
    source: str = SHIPPED

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])


def head_from_state_dict(obj: Any, source: str = "<memory>") -> FoundHead:
    """The head from what ``torch.load`` gave: the authors' ``{"decoder": {"weight", "bias"}}`` (as their
    ``decoder_save_weights`` writes it) or a bare ``{"weight", "bias"}`` of a ``Conv2d(D, 1, 1)``."""
    from collections.abc import Mapping

    sd = obj.get("decoder", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping) or not {"weight", "bias"} <= set(sd):
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"found: head {source} is not a FOUND head: expected {{'decoder': {{'weight', 'bias'}}}} "
                         f"(a Conv2d(D, 1, 1) state dict), found {keys}; use head={SHIPPED} or head={NONE}")
    w, b = sd["weight"], sd["bias"]
    if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.dim() == 4
            and w.shape[0] == 1 and w.shape[1] >= 1 and tuple(w.shape[2:]) == (1, 1) and tuple(b.shape) == (1,)):
        shapes = tuple(getattr(w, "shape", ())), tuple(getattr(b, "shape", ()))
        raise ValueError(f"found: head {source} has weight/bias of shapes {shapes}; a FOUND head is a 1x1 "
                         "convolution to one channel: weight (1, D, 1, 1), bias (1,)")
    w, b = w.detach().to("cpu", torch.float32).contiguous(), b.detach().to("cpu", torch.float32).contiguous()
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
        raise ValueError(f"found: head {source} holds NaN or inf weights")
    return FoundHead(w, b, source)


def load_head(head: str | os.PathLike) -> Optional[FoundHead]:
    """``"shipped"``: the authors' head (``found_head/decoder_weights.pt``, read without network);
    ``"none"``: None (no head); anything else: the path of a head file (:func:`head_from_state_dict`)."""
    from pipeline.weights import read_checkpoint

    if not isinstance(head, (str, os.PathLike)) or isinstance(head, bool) or str(head).strip() == "":
        raise ValueError(f"found: head must be {HEAD_CHOICES}, got {head!r}")
    name = str(head)
    if name == NONE:
        return None
    path = SHIPPED_HEAD_FILE if name == SHIPPED else Path(name).expanduser()
    if name != SHIPPED and not path.is_file():
        raise ValueError(f"found: no head file at {path}; head takes {HEAD_CHOICES}")
    hint = "" if name != SHIPPED else "The shipped head is part of the package (reinstall it: make install)."
    return head_from_state_dict(read_checkpoint(path, hint), SHIPPED if name == SHIPPED else str(path))


def resolve_head(head) -> Optional[FoundHead]:
    """A loaded :class:`FoundHead` or None as it is; a name or path through :func:`load_head`."""
    if head is None or isinstance(head, FoundHead):
        return head
    return load_head(head)


def check_head_width(head: Optional[FoundHead], dim: int) -> None:
    """ValueError naming ``head`` when its input width is not the features' ``dim``."""
    if head is not None and head.in_dim != int(dim):
        raise ValueError(
            f"found: the head ({head.source}) takes {head.in_dim}-dim keys (the authors' head: DINO ViT-S/8) but the "
            f"backbone gives {dim}-dim features; use arch=dino_vits8, or head={NONE} (the training-free background "
            "seed, any ViT), or head=/path/to/a head trained for this backbone")


# --------------------------------------------------------------------------------------------- the result
@dataclass
class FoundResult(FirstOfRanked):
    """What FOUND found in one image (CPU numpy; patch indices row-major).

    ``boxes``: float64 (4,) xyxy pixel boxes, x2/y2 exclusive, ranked (largest component first);
    ``scores``: one float per box (module docstring); ``masks``: one (h, w) bool component per box;
    ``seed``: the background seed patch (least weighted attention); ``bkg_mask``: (h, w) bool, the
    patches whose similarity to the seed is ``> bkg_th``; ``similarity``: (h, w) float32, that similarity;
    ``object_mask``: (h, w) bool, the mask the boxes come from (``sigmoid > 0.5``, or ``~bkg_mask``
    without a head); ``saliency``: (h, w) float32 sigmoid of the head (None without one); ``beta``: (nh,)
    float32 head weights; ``degenerate``: True for the whole-image fallback (empty object mask).
    ``box``, ``score`` and ``mask`` are the first box's.
    """

    boxes: list[np.ndarray]
    scores: list[float]
    masks: list[np.ndarray]
    seed: int
    bkg_mask: np.ndarray
    similarity: np.ndarray
    object_mask: np.ndarray
    beta: np.ndarray
    saliency: Optional[np.ndarray] = None
    bkg_th: float = 0.3
    degenerate: bool = False


# ------------------------------------------------------------------------------------------ the algorithm
def sparsity_weights(att: torch.Tensor) -> torch.Tensor:
    """(1, nh) ``beta`` of a (1, nh, N) CLS attention (step 1 of the module docstring), float32."""
    nb, nh, n = att.shape
    threshold = torch.mean(att.reshape(nb, -1), dim=1)
    Q = torch.sum(att > threshold[:, None, None], dim=2) / n
    return torch.log(torch.sum(Q + EPSILON, dim=1)[:, None] / (Q + EPSILON))


def background_seed(feats: torch.Tensor, att: torch.Tensor, dims: tuple[int, int], bkg_th: float
                    ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3: ``(seed, similarity (N,), background (N,) bool, beta (nh,))`` from keys (N, D) and the CLS
    attention (nh, N), on their device."""
    h, w = dims
    n, d = feats.shape
    nh = att.shape[0]
    a = att[None]                                                     # (1, nh, N)
    beta = sparsity_weights(a)                                        # (1, nh)
    descs = (feats[None].reshape(1, n, nh, d // nh) * beta[:, None, :, None]).reshape(1, n, d)
    descs = F.normalize(descs, dim=-1, p=2)
    sim = torch.bmm(descs, descs.permute(0, 2, 1))                    # (1, N, N), the full product
    weighted = a.reshape(1, nh, h, w) * beta[:, :, None, None]
    seed = int(torch.argmin(torch.sum(weighted, dim=1).reshape(1, -1), dim=-1)[0])
    row = sim[0, seed]
    return seed, row, row > bkg_th, beta[0]


def head_logits(feats: torch.Tensor, dims: tuple[int, int], head: FoundHead) -> torch.Tensor:
    """(h, w) logits of the 1x1 head on the keys laid out as the reference's ``(1, D, h, w)`` view."""
    h, w = dims
    x = feats.reshape(1, h, w, -1).permute(0, 3, 1, 2)
    out = F.conv2d(x, head.weight.to(feats.device), head.bias.to(feats.device))
    return out[0, 0]


def ranked_components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of an (h, w) bool mask, largest first, equal sizes by lowest label."""
    labels, count = scipy.ndimage.label(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    order = sorted(range(1, count + 1), key=lambda lab: (-int(sizes[lab]), lab))
    return [labels == lab for lab in order]


def _attention(cls_attn, n: int) -> torch.Tensor:
    att = cls_attn if isinstance(cls_attn, torch.Tensor) else torch.as_tensor(np.asarray(cls_attn))
    if att.dim() == 3 and att.shape[0] == 1:
        att = att[0]
    if att.dim() != 2 or att.shape[0] < 1 or att.shape[1] != n:
        raise ValueError(f"found: cls_attn must be (num_heads, N) with N = {n} patches (the last block's CLS-to-"
                         f"patch attention of every head), got shape {tuple(att.shape)}")
    att = att.detach().to(torch.float32)
    if not bool(torch.isfinite(att).all()):
        raise ValueError("found: cls_attn contains NaN or inf; check the backbone weights and the input image")
    return att


def check_found_params(bkg_th, mode) -> float:
    if isinstance(bkg_th, bool) or not isinstance(bkg_th, (int, float, np.floating)) \
            or not -1.0 < float(bkg_th) < 1.0:
        raise ValueError(f"found: bkg_th must be a number in (-1, 1) (a cosine-similarity threshold), got {bkg_th!r}")
    if mode not in MODES:
        raise ValueError(f"found: mode must be one of {', '.join(MODES)} (single: the largest component, FOUND's "
                         f"single-object protocol; multi: every component, ranked), got {mode!r}")
    return float(bkg_th)


def found(feats: torch.Tensor, cls_attn: torch.Tensor, dims: tuple[int, int], patch_size: int,
          image_size: tuple[int, int], head: str = SHIPPED, bkg_th: float = 0.3, mode: str = "single"
          ) -> FoundResult:
    """Run FOUND on one image (every step in the module docstring).

    ``feats``: (N, D) last-block keys, CLS dropped (a leading batch of 1 accepted), CPU or CUDA;
    ``cls_attn``: (nh, N) the last block's CLS attention of every head, on the same device;
    ``dims = (h, w)``; ``image_size = (H, W)`` of the unpadded image. ``head``: ``"shipped"`` (the authors'
    head), ``"none"`` (the background seed alone), the path of a head file, or a :class:`FoundHead`
    already loaded (what the miner passes: a name or path is read from disk on every call). ``bkg_th``: the
    cosine threshold of the background; ``mode``: "single" (the largest component) or "multi" (every one).
    """
    k = as_feats(feats, "found")
    n, d = k.shape
    h, w, p, H, W = check_grid(n, dims, patch_size, image_size, "found")
    th = check_found_params(bkg_th, mode)
    att = _attention(cls_attn, n).to(k.device)
    nh = att.shape[0]
    if d % nh:
        raise ValueError(f"found: the features' {d} dims do not split into the attention's {nh} heads")
    decoder = resolve_head(head)
    check_head_width(decoder, d)

    seed, sim, bkg, beta = background_seed(k, att, (h, w), th)
    similarity = sim.cpu().numpy().reshape(h, w)
    bkg_mask = bkg.cpu().numpy().reshape(h, w)
    saliency = None
    if decoder is not None:
        prob = torch.sigmoid(head_logits(k, (h, w), decoder))
        object_mask = (prob > 0.5).cpu().numpy()
        saliency = prob.cpu().numpy()
        values = saliency.astype(np.float64)
    else:
        object_mask = ~bkg_mask
        values = (1.0 - similarity.astype(np.float64)) / 2.0

    comps = ranked_components(object_mask)
    common = dict(seed=seed, bkg_mask=bkg_mask, similarity=similarity, object_mask=object_mask,
                  beta=beta.cpu().numpy(), saliency=saliency, bkg_th=th)
    if not comps:
        full = np.ones((h, w), dtype=bool)
        return FoundResult(boxes=[np.array([0.0, 0.0, float(W), float(H)])], scores=[0.0], masks=[full],
                           degenerate=True, **common)
    if mode == "single":
        comps = comps[:1]
    return FoundResult(boxes=[grid_mask_box(m, p, (H, W)) for m in comps],
                       scores=[float(np.clip(values[m].mean(), 0.0, 1.0)) for m in comps], masks=comps, **common)
