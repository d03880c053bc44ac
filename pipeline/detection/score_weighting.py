"""Score weighting: CuVLER's soft-target loss (Arica et al., CVPR 2024), each pseudo-box's loss weighted by its score.

VoteCut scores every pseudo-box (its cluster's size over the image's largest cluster's, in (0, 1]); CuVLER trains its
detector on them as soft targets (``MODEL.ROI_HEADS.USE_SOFT_TARGETS``; ``cad/modeling/roi_heads/fast_rcnn.py`` and
``mask_head.py``, MIT). Implemented from that code on torchvision's :class:`RoIHeads` (a subclass of
:class:`~pipeline.detection.droploss.DropLossRoIHeads`, so DropLoss still applies). A sampled RoI matched to a
pseudo-box of score ``s`` (a foreground RoI):

- **classification**: soft target, probability ``s`` on its class and ``1 - s`` on the background (background RoIs:
  the background, as before): ``CE_soft = CE(class) + (1 - s) (CE(bg) - CE(class))``, averaged as torchvision's
  loss (over the RoIs not ignored by DropLoss; CuVLER's mean over all RoIs is the same without DropLoss);
- **box regression**: its smooth-L1 times ``s``, summed, over the number of sampled RoIs (torchvision's normaliser);
- **mask** (a Mask R-CNN): its per-pixel BCE times ``s``, averaged over all mask pixels (CuVLER's ``weight=``).

The RPN's losses are not weighted (CuVLER does not weight them either). With every score 1 each loss is
torchvision's to the bit (the correction terms are exact zeros; ``tests/test_score_weighting.py``).

The Cascade head (:class:`ScoreWeightedCascadeRoIHeads`, as CuVLER's ``custom_cascade_rcnn.py``): every stage's
class and box losses are these, each stage's boxes weighted by the score of the pseudo-box that stage's matcher
(IoU 0.5 / 0.6 / 0.7) matches them to; the mask loss (last stage's foreground boxes) as above. The cascade's
per-stage losses, gradient scale and DropLoss per stage are unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

from pipeline.detection.cascade import CascadeRoIHeads
from pipeline.detection.droploss import IGNORE_INDEX, DropLossRoIHeads


def roi_scores(matched_idxs: list[Tensor], targets: list[dict]) -> list[Tensor]:
    """Per image, the score of the pseudo-box each sampled RoI is matched to (1 for an image without boxes, whose RoIs
    are all background)."""
    out = []
    for idx, t in zip(matched_idxs, targets, strict=True):
        scores = t.get("scores")
        if scores is None or scores.numel() == 0:
            out.append(torch.ones(idx.shape[0], device=idx.device))
        else:
            out.append(scores.to(idx.device, torch.float32)[idx.clamp(min=0)])
    return out


def weighted_fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                           regression_targets: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with CuVLER's soft targets: ``weights`` (per sampled RoI, its pseudo-box's
    score; used for the foreground RoIs) as the class probability of the target and the weight of the box loss."""
    labels_, targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
    w = torch.cat(weights, dim=0).to(class_logits.dtype)
    classification = F.cross_entropy(class_logits, labels_)
    pos = torch.where(labels_ > 0)[0]
    labels_pos = labels_[pos]
    logp = F.log_softmax(class_logits[pos], dim=1)
    # CE(bg) - CE(class) = log p(class) - log p(bg); times (1 - s): exactly 0 where s = 1
    soft = ((1 - w[pos]) * (logp[torch.arange(len(pos), device=pos.device), labels_pos] - logp[:, 0])).sum()
    classification = classification + soft / (labels_ != IGNORE_INDEX).sum().clamp(min=1)
    N = class_logits.shape[0]
    deltas = box_regression.reshape(N, box_regression.size(-1) // 4, 4)[pos, labels_pos]
    box = F.smooth_l1_loss(deltas, targets[pos], beta=1 / 9, reduction="none") * w[pos, None]
    return classification, box.sum() / labels_.numel()


def weighted_maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                           gt_labels: list[Tensor], mask_matched_idxs: list[Tensor], weights: list[Tensor]) -> Tensor:
    """torchvision's ``maskrcnn_loss`` with each positive RoI's BCE weighted by its pseudo-box's score
    (``weights``: per image, per positive RoI), averaged over all pixels (CuVLER's ``mask_rcnn_loss_weighted``)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = torch.cat([project_masks_on_boxes(m, p, i, size)
                         for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)], dim=0)
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    w = torch.cat(weights, dim=0).to(mask_logits.dtype)[:, None, None]
    return F.binary_cross_entropy_with_logits(
        mask_logits[torch.arange(labels.shape[0], device=labels.device), labels], targets, weight=w)


class ScoreWeightedRoIHeads(DropLossRoIHeads):
    """torchvision's RoIHeads (with DropLoss' ``iou_threshold``, 0: off) whose box and mask losses are weighted by the
    pseudo-boxes' ``scores`` (targets' ``"scores"``; missing: 1). Training only; inference is torchvision's."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.keypoint_roi_pool is not None:
            raise ValueError("score weighting: keypoint heads are not supported")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        weights = roi_scores(matched_idxs, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = weighted_fastrcnn_loss(class_logits, box_regression, labels,
                                                               regression_targets, weights)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos)]
            pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals,
                                                                                image_shapes)))
            losses["loss_mask"] = weighted_maskrcnn_loss(
                mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
                pos_matched, [w[i] for w, i in zip(weights, pos)])
        return [], losses


class ScoreWeightedCascadeRoIHeads(CascadeRoIHeads):
    """:class:`CascadeRoIHeads` (DropLoss per stage kept) whose every stage's box losses and the mask loss are
    weighted by the scores of the pseudo-boxes (targets' ``"scores"``; missing: 1) that stage matched its boxes to.
    Training only; inference is the cascade's."""

    def stage_loss(self, logits, deltas, labels, reg_targets, matched, targets):
        return weighted_fastrcnn_loss(logits, deltas, labels, reg_targets, roi_scores(matched, targets))

    def mask_loss(self, logits, boxes, targets, matched):
        return weighted_maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
                                      matched, roi_scores(matched, targets))


def _retyped(heads: RoIHeads, cls: type) -> RoIHeads:
    """A ``cls`` with ``heads``' submodules (shared), parameters, hooks and settings, DropLoss' threshold kept."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) for k, v in vars(heads).items()})
    new.iou_threshold = getattr(heads, "iou_threshold", 0.0)
    if isinstance(new, CascadeRoIHeads):  # stage 0's matcher and coder stay torchvision's sampling ones
        new.stage_matchers = [new.proposal_matcher, *heads.stage_matchers[1:]]
        new.stage_coders = [new.box_coder, *heads.stage_coders[1:]]
    return new


def with_score_weighting(model: nn.Module) -> nn.Module:
    """Opt a built torchvision ``FasterRCNN``/``MaskRCNN``, or one with a Cascade head (``cascade_*`` presets), in
    to score weighting (in place; state_dict unchanged; DropLoss' threshold kept)."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, RoIHeads):
        raise TypeError(f"with_score_weighting needs a torchvision FasterRCNN/MaskRCNN, got {type(model).__name__}")
    # a subclass of another kind would lose its overrides
    if type(heads) in (RoIHeads, DropLossRoIHeads):
        model.roi_heads = _retyped(heads, ScoreWeightedRoIHeads)
    elif type(heads) is CascadeRoIHeads:
        model.roi_heads = _retyped(heads, ScoreWeightedCascadeRoIHeads)
    elif not isinstance(heads, (ScoreWeightedRoIHeads, ScoreWeightedCascadeRoIHeads)):
        raise TypeError(f"score weighting replaces torchvision's RoIHeads, not a {type(heads).__name__}")
    return model
