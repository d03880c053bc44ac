"""DropLoss (Wang et al., "Cut and Learn for Unsupervised Object Detection and Instance Segmentation", CVPR 2023,
Eq. 1): ``L_drop(r_i) = 1(IoU_max(r_i) > tau) * L_vanilla(r_i)``. The box head's loss of a sampled region proposal
``r_i`` whose best IoU with the image's ground-truth (pseudo-)boxes is at most ``tau`` is dropped: pseudo-boxes miss
many objects, and a proposal far from every pseudo-box may well be an object, so it is not taught "background".

Implemented from the paper on top of torchvision's :class:`RoIHeads` (a subclass, not a copy):
:func:`drop_loss_weights` computes the per-RoI weights (0/1), :class:`DropLossRoIHeads` applies them, and
:func:`with_drop_loss` opts a built ``FasterRCNN``/``MaskRCNN`` in (state_dict unchanged). Only training changes;
inference and checkpoints are torchvision's.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou

# the target that torch's cross-entropy (torchvision's fastrcnn_loss uses its default) leaves out of the loss and
# of its mean
IGNORE_INDEX = -100


def check_threshold(iou_threshold: Optional[float]) -> float:
    """``iou_threshold`` as a float in [0, 1); ``None`` is 0 (off)."""
    tau = 0.0 if iou_threshold is None else float(iou_threshold)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"the DropLoss IoU threshold must be in [0, 1) (0 or None: off), got {iou_threshold!r}")
    return tau


def drop_loss_weights(proposals: list[Tensor], gt_boxes: list[Tensor],
                      iou_threshold: Optional[float]) -> list[Tensor]:
    """Per image, the weight of each proposal (xyxy, ``(n_i, 4)``) in the box head's loss: 1 where its maximum IoU
    with the image's GT boxes (``(g_i, 4)``) is above ``iou_threshold``, else 0 (CutLER Eq. 1).

    ``None``/0 is off (all ones: an IoU is never negative, and the threshold 0 means "off" in the config, as CutLER's
    0.01 is the only value it uses). An image without GT boxes keeps every proposal (its max IoU is undefined: it is
    a negative image, all its RoIs are background by torchvision's rule, and dropping them all would leave a batch
    of such images with no loss at all).
    """
    tau = check_threshold(iou_threshold)
    out = []
    for props, gts in zip(proposals, gt_boxes, strict=True):
        ones = torch.ones(props.shape[0], dtype=props.dtype if props.is_floating_point() else torch.float32,
                          device=props.device)
        if tau == 0.0 or gts.numel() == 0 or props.numel() == 0:
            out.append(ones)
            continue
        best = box_iou(gts.to(props.dtype), props).max(dim=0).values
        out.append((best > tau).to(ones.dtype))
    return out


class DropLossRoIHeads(RoIHeads):
    """torchvision's :class:`RoIHeads` whose box-head loss drops the sampled proposals that miss every GT box
    (max IoU <= ``iou_threshold``, CutLER Eq. 1). Build it from a built model's heads with
    :meth:`from_roi_heads` (or :func:`with_drop_loss`); ``iou_threshold`` may be changed at any time.

    How the weights are applied: :meth:`select_training_samples` (torchvision's sampling, unchanged and with the same
    random draws) marks each dropped RoI's class target as ``IGNORE_INDEX``; torchvision's ``fastrcnn_loss`` then
    computes ``F.cross_entropy(logits, labels)``, which leaves ignored targets out of the sum and of the mean. So
    the classification loss is ``sum_i w_i CE_i / sum_i w_i``:

    - **normalisation: the mean over the kept RoIs** (the standard cross-entropy with ignored targets). Eq. 1
      multiplies each RoI's loss by the indicator; taking the mean over the RoIs that are left keeps the loss on
      the scale of the plain loss whatever share is dropped (in unsupervised training a large share of the
      background RoIs can miss every pseudo-box, and a mean over all sampled RoIs would shrink the
      classification loss, i.e. its learning rate, by that share from image to image). With every weight 1 it
      is exactly torchvision's loss.
    - **box regression**: unchanged. It concerns only foreground RoIs (IoU >= the matcher's foreground threshold,
      0.5), which are never dropped while ``iou_threshold`` is below it (CutLER: 0.01), and it keeps torchvision's
      normaliser (the number of sampled RoIs), so it is torchvision's box loss to the bit. (A threshold at or
      above the foreground threshold would also drop foreground RoIs: their targets are then ignored in the
      class, box and mask losses alike, as torchvision selects those by ``label > 0``.)
    - the mask (and keypoint) losses use the foreground RoIs only and are unchanged.

    A batch always keeps at least the GT boxes, which torchvision adds to the proposals (IoU 1; the sampler
    takes at least one foreground RoI per image with boxes), and images without boxes keep all their RoIs, so
    the mean is never over nothing.
    """

    iou_threshold: float = 0.0

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, iou_threshold: Optional[float]) -> "DropLossRoIHeads":
        """A :class:`DropLossRoIHeads` with ``heads``' submodules (shared, not copied), parameters, buffers, hooks and
        settings (matcher, sampler, box coder, NMS, score threshold, detections per image)."""
        if type(heads) not in (RoIHeads, cls):
            raise TypeError(f"DropLoss replaces torchvision's RoIHeads, not a {type(heads).__name__} (its overrides "
                            "would be lost)")
        new = cls.__new__(cls)
        # shallow copies: new dicts of submodules/parameters/hooks holding the same objects; new matcher, sampler
        # and coder objects with the same settings
        new.__dict__.update({k: copy.copy(v) for k, v in vars(heads).items()})
        new.iou_threshold = check_threshold(iou_threshold)
        return new

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        if check_threshold(self.iou_threshold) > 0.0:
            gt_boxes = [t["boxes"] for t in targets]
            weights = drop_loss_weights(proposals, gt_boxes, self.iou_threshold)
            labels = [lab.masked_fill(w == 0, IGNORE_INDEX) for lab, w in zip(labels, weights)]
        return proposals, matched_idxs, labels, regression_targets

    def extra_repr(self) -> str:
        return f"iou_threshold={self.iou_threshold}"


def with_drop_loss(model: nn.Module, iou_threshold: Optional[float]) -> nn.Module:
    """Opt a built torchvision ``FasterRCNN``/``MaskRCNN`` (e.g. from ``build_detector``) in to DropLoss: its
    ``roi_heads`` becomes a :class:`DropLossRoIHeads` with the same submodules and settings (the state_dict's keys
    and tensors are unchanged, so checkpoints load either way). In place; returns ``model``.

    ``iou_threshold`` None/0 is off: a plain model is returned untouched, a DropLoss one has its threshold set to 0
    (torchvision's loss). A Cascade R-CNN head (:class:`pipeline.detection.cascade.CascadeRoIHeads`) has DropLoss
    built in: its threshold is set, 0 included (every stage drops on its own boxes, as CutLER does). Call it before
    wrapping the model in DDP; the optimizer may be built before or after (the parameters are the same objects).
    """
    from pipeline.detection.cascade import CascadeRoIHeads  # imports this module

    tau = check_threshold(iou_threshold)
    heads = getattr(model, "roi_heads", None)
    if isinstance(heads, CascadeRoIHeads):  # DropLoss built in, per stage on that stage's boxes
        heads.iou_threshold = tau
        return model
    if not isinstance(heads, RoIHeads):
        raise TypeError(f"with_drop_loss needs a torchvision FasterRCNN/MaskRCNN, got {type(model).__name__}")
    if isinstance(heads, DropLossRoIHeads):
        heads.iou_threshold = tau
    elif tau > 0.0:
        model.roi_heads = DropLossRoIHeads.from_roi_heads(heads, tau)
    return model
