"""Cascade R-CNN heads (Cai & Vasconcelos, "Cascade R-CNN: Delving into High Quality Object Detection", CVPR 2018),
CutLER's detector, built from torchvision's parts: :class:`CascadeRoIHeads` replaces a built ``MaskRCNN``'s (or
``FasterRCNN``'s) ``roi_heads`` with the same call signature and outputs (:func:`cascade_roi_heads`).

Three box stages, each with its own box head (``TwoMLPHead``), predictor (class scores and one class-agnostic box
delta, :class:`CascadePredictor`), proposal matcher (IoU 0.5 / 0.6 / 0.7: a box is foreground at stage ``t`` when its
best IoU with a GT box is at least the stage's threshold, background otherwise) and box coder (weights (10, 10, 5, 5),
(20, 20, 10, 10), (30, 30, 15, 15): later stages regress smaller deltas). Stage ``t + 1`` runs on stage ``t``'s
regressed boxes (detached, clipped to the image).

Training: stage 0 samples the RPN's proposals with the GT boxes added (torchvision's ``select_training_samples``:
matcher, fg/bg sampler, its random draws); stages 1 and 2 re-label the previous stage's refined boxes of those same
samples with their own matcher (no re-sampling; empty boxes after clipping are left out), so the foreground share
grows with the box quality, as the paper describes. Losses: torchvision's ``fastrcnn_loss`` per stage, reported per
stage as ``loss_classifier_s{t}`` and ``loss_box_reg_s{t}`` (not summed; the trainer sums every loss); each stage's
pooled features pass a gradient scale of 1/3 on the way back, so the backbone gets the stages' mean gradient while
each head gets its full loss. The mask head trains on the last stage's foreground boxes (``loss_mask``). The
losses are computed by :meth:`CascadeRoIHeads.stage_loss` and :meth:`~CascadeRoIHeads.mask_loss`, which score
weighting overrides (:class:`pipeline.detection.score_weighting.ScoreWeightedCascadeRoIHeads`).

Inference: each stage scores its own input boxes (stage 0 the proposals, stage ``t`` stage ``t - 1``'s refined
boxes); the class scores are the mean of the three stages' softmax probabilities, the boxes are the last stage's
regression of its input boxes; then torchvision's post-processing (clip, score threshold, small boxes, per-class
NMS, top detections), and the mask head runs on the final detections.

DropLoss (CutLER Eq. 1): ``iou_threshold`` > 0 ignores, at every stage, the class loss of the boxes of that stage
whose best IoU with the GT boxes is at most the threshold (:func:`pipeline.detection.droploss.with_drop_loss`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import box_iou, boxes as box_ops

from pipeline.detection.droploss import IGNORE_INDEX, check_threshold, drop_loss_weights

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class CascadePredictor(FastRCNNPredictor):
    """``FastRCNNPredictor``'s class scores (``num_classes`` with the background) and one class-agnostic box delta
    (4 numbers) per RoI."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


class CascadeRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` interface with a cascade of box stages (see the module). ``box_head`` and
    ``box_predictor`` are ``ModuleList`` s of the stages (state_dict keys ``box_head.<t>.*``); ``proposal_matcher``,
    ``box_coder`` are stage 0's; ``stage_matchers`` and ``stage_coders`` hold every stage's. Mask and settings
    arguments are ``RoIHeads``'."""

    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 *, stage_ious: Sequence[float] = STAGE_IOUS, stage_weights=STAGE_WEIGHTS,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, mask_roi_pool=None, mask_head=None,
                 mask_predictor=None, iou_threshold: Optional[float] = None):
        n = len(stage_ious)
        if not (len(box_heads) == len(box_predictors) == len(stage_weights) == n >= 1):
            raise ValueError(f"a cascade needs one box head, predictor, IoU and weight tuple per stage, got "
                             f"{len(box_heads)}, {len(box_predictors)}, {n}, {len(stage_weights)}")
        super().__init__(box_roi_pool, nn.ModuleList(box_heads), nn.ModuleList(box_predictors), stage_ious[0],
                         stage_ious[0], batch_size_per_image, positive_fraction, stage_weights[0], score_thresh,
                         nms_thresh, detections_per_img, mask_roi_pool, mask_head, mask_predictor)
        self.stage_matchers = [self.proposal_matcher] + [Matcher(iou, iou, False) for iou in stage_ious[1:]]
        self.stage_coders = [self.box_coder] + [BoxCoder(tuple(w)) for w in stage_weights[1:]]
        self.iou_threshold = check_threshold(iou_threshold)  # DropLoss, per stage; 0: off

    @property
    def num_stages(self) -> int:
        return len(self.box_head)

    def run_stage(self, stage: int, features: dict[str, Tensor], boxes: list[Tensor],
                  image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Stage ``stage``'s class logits ``(N, K + 1)`` and box deltas ``(N, 4)`` on ``boxes`` (per image)."""
        x = self.box_roi_pool(features, boxes, image_shapes)
        x = _ScaleGradient.apply(x, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](x))

    def refine(self, stage: int, deltas: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]],
               nonempty: bool = False) -> list[Tensor]:
        """Stage ``stage``'s regressed boxes (detached, float32, clipped to each image); ``nonempty``: without the
        boxes of zero width or height."""
        pred = self.stage_coders[stage].decode(deltas.detach().float(), [b.float() for b in boxes]).reshape(-1, 4)
        out = []
        for b, shape in zip(pred.split([len(b) for b in boxes]), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            out.append(b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] if nonempty else b)
        return out

    def label_stage(self, stage: int, boxes: list[Tensor], gt_boxes: list[Tensor],
                    gt_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image, each box's matched GT index (0 for background) and class target by stage ``stage``'s matcher
        (0: background, best IoU below the stage's threshold; an image without GT: all background)."""
        matched, labels = [], []
        for b, g, gl in zip(boxes, gt_boxes, gt_labels):
            if g.numel() == 0:
                zeros = torch.zeros(len(b), dtype=torch.int64, device=b.device)
                matched.append(zeros)
                labels.append(zeros.clone())
                continue
            idx = self.stage_matchers[stage](box_iou(g.to(b.dtype), b))
            lab = gl[idx.clamp(min=0)].to(torch.int64)
            lab[idx < 0] = 0
            matched.append(idx.clamp(min=0))
            labels.append(lab)
        return matched, labels

    def _regression_targets(self, stage: int, boxes, matched, gt_boxes) -> list[Tensor]:
        refs = [(g if g.numel() else torch.zeros((1, 4), dtype=b.dtype, device=b.device)).to(b.dtype)[m]
                for b, m, g in zip(boxes, matched, gt_boxes)]
        return list(self.stage_coders[stage].encode(refs, boxes))

    def _drop(self, labels: list[Tensor], boxes: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        if check_threshold(self.iou_threshold) == 0.0:
            return labels
        weights = drop_loss_weights(boxes, gt_boxes, self.iou_threshold)
        return [lab.masked_fill(w == 0, IGNORE_INDEX) for lab, w in zip(labels, weights)]

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: Optional[list[dict[str, Tensor]]] = None):
        """As ``RoIHeads.forward``: training ``([], losses)``, inference ``(detections, {})``."""
        if not self.training:
            return self._detect(features, proposals, image_shapes), {}
        self.check_targets(targets)
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
        return [], self._losses(features, proposals, image_shapes, targets)

    def _losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        losses = {}
        for stage in range(self.num_stages):
            if stage == 0:
                boxes, matched, labels, reg_targets = self.select_training_samples(proposals, targets)
            else:
                boxes = self.refine(stage - 1, deltas, boxes, image_shapes, nonempty=True)
                matched, labels = self.label_stage(stage, boxes, gt_boxes, gt_labels)
                reg_targets = self._regression_targets(stage, boxes, matched, gt_boxes)
            labels = self._drop(labels, boxes, gt_boxes)
            logits, deltas = self.run_stage(stage, features, boxes, image_shapes)
            # class-agnostic deltas, repeated per class so that torchvision's loss picks them for any label
            cls_loss, box_loss = self.stage_loss(logits, deltas.repeat(1, logits.shape[1]), labels, reg_targets,
                                                 matched, targets)
            losses[f"loss_classifier_s{stage}"], losses[f"loss_box_reg_s{stage}"] = cls_loss, box_loss
        if self.has_mask():
            fg = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [b[i] for b, i in zip(boxes, fg)]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            losses["loss_mask"] = self.mask_loss(logits, mask_boxes, targets, [m[i] for m, i in zip(matched, fg)])
        return losses

    def stage_loss(self, logits: Tensor, deltas: Tensor, labels: list[Tensor], reg_targets: list[Tensor],
                   matched: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """One stage's class and box losses: torchvision's ``fastrcnn_loss``. ``matched`` (per image, each box's
        target index in this stage; background boxes: 0) and ``targets`` are for a subclass that weights them
        (:class:`pipeline.detection.score_weighting.ScoreWeightedCascadeRoIHeads`)."""
        return fastrcnn_loss(logits, deltas, labels, reg_targets)

    def mask_loss(self, logits: Tensor, boxes: list[Tensor], targets: list[dict[str, Tensor]],
                  matched: list[Tensor]) -> Tensor:
        """The mask loss of the last stage's foreground ``boxes`` (``matched``: their target indices):
        torchvision's ``maskrcnn_loss``."""
        return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets], matched)

    def stage_scores(self, features, proposals, image_shapes) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """Inference through the stages: every stage's class probabilities on its own input boxes, the last stage's
        box deltas and its input boxes."""
        probs, boxes = [], proposals
        for stage in range(self.num_stages):
            if stage:
                boxes = self.refine(stage - 1, deltas, boxes, image_shapes)
            logits, deltas = self.run_stage(stage, features, boxes, image_shapes)
            probs.append(F.softmax(logits.float(), -1))
        return probs, deltas, boxes

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        probs, deltas, boxes = self.stage_scores(features, proposals, image_shapes)
        scores = torch.stack(probs).mean(0)
        final = self.stage_coders[-1].decode(deltas.float(), [b.float() for b in boxes]).reshape(-1, 4)
        counts = [len(b) for b in boxes]
        result = [self._postprocess(b, s, shape)
                  for b, s, shape in zip(final.split(counts), scores.split(counts), image_shapes)]
        if self.has_mask():
            mask_boxes = [r["boxes"] for r in result]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            for r, m in zip(result, maskrcnn_inference(logits, [r["labels"] for r in result])):
                r["masks"] = m
        return result

    def _postprocess(self, boxes: Tensor, scores: Tensor, image_shape) -> dict[str, Tensor]:
        """torchvision's ``postprocess_detections`` for one image with class-agnostic boxes."""
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        n, k = scores.shape[0], scores.shape[1] - 1
        boxes = boxes[:, None, :].expand(n, k, 4).reshape(-1, 4)
        labels = torch.arange(1, k + 1, device=scores.device).view(1, -1).expand(n, k).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}

    def extra_repr(self) -> str:
        ious = [m.high_threshold for m in self.stage_matchers]
        return f"stage_ious={ious}, iou_threshold={self.iou_threshold}"


def cascade_roi_heads(heads: RoIHeads, num_classes: int, representation_size: int = 1024) -> CascadeRoIHeads:
    """A :class:`CascadeRoIHeads` in place of a built torchvision ``RoIHeads`` (``TwoMLPHead`` box head): its RoI
    pooler, mask parts and settings (sampling, score threshold, NMS, detections per image) are kept, its box head
    and predictor are replaced by three new stages of ``representation_size`` (random init, from the global RNG).
    ``num_classes`` counts the background."""
    in_features = heads.box_head.fc6.in_features
    stages = range(len(STAGE_IOUS))
    return CascadeRoIHeads(
        heads.box_roi_pool, [TwoMLPHead(in_features, representation_size) for _ in stages],
        [CascadePredictor(representation_size, num_classes) for _ in stages],
        batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        positive_fraction=heads.fg_bg_sampler.positive_fraction, score_thresh=heads.score_thresh,
        nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img, mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head, mask_predictor=heads.mask_predictor)
