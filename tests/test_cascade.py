"""Cascade R-CNN heads (pipeline/detection/cascade.py): per-stage IoU thresholds, a training step, inference
(mean of the stages' scores), the r50 preset's backbone and DropLoss per stage."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet50
from torchvision.ops import boxes as box_ops

import pipeline.detection.cascade as cascade
from pipeline.detection.builders import build_detector
from pipeline.detection.cascade import CascadeRoIHeads
from pipeline.detection.droploss import IGNORE_INDEX, with_drop_loss
from pipeline.detection.settings import MASK_PRESETS, PRESETS, RANDOM_ONLY, DetectorSettings

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(min_size=64, max_size=96, rpn_topk=(60, 20, 60, 10), batch_size_per_image=16,
             rpn_batch_size_per_image=32)
SIZE = 128
GT = torch.tensor([[0., 0., 100., 100.]])
# proposals [0, 0, 100, h] have IoU h / 100 with GT; the last one misses it (IoU 0)
PROPOSALS = torch.tensor([[0., 0., 100., 30.], [0., 0., 100., 55.], [0., 0., 100., 65.], [0., 0., 100., 75.],
                          [110., 110., 127., 127.]])
# class targets per stage (IoU >= 0.5 / 0.6 / 0.7 foreground), for the proposals then the GT box torchvision adds
STAGE_LABELS = [[0, 1, 1, 1, 0, 1], [0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 1]]


@pytest.fixture(scope="module")
def model():
    return build_detector("cascade_mask_mobilenet_fpn", 1, **SMALL)


def _features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0": torch.randn(1, 256, SIZE // 8, SIZE // 8, generator=g),
            "1": torch.randn(1, 256, SIZE // 16, SIZE // 16, generator=g)}


def _target() -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    masks[0, 10:90, 5:95] = 1
    return {"boxes": GT.clone(), "labels": torch.ones(1, dtype=torch.int64), "masks": masks}


def _train_labels(heads: CascadeRoIHeads, monkeypatch) -> tuple[list[torch.Tensor], dict]:
    """The class targets each stage's loss sees on PROPOSALS, with the box regressors zeroed (each stage's boxes
    are then the proposals themselves)."""
    seen = []

    def record(logits, regression, labels, targets):
        seen.append(torch.cat(labels))
        return real(logits, regression, labels, targets)

    real = cascade.fastrcnn_loss
    monkeypatch.setattr(cascade, "fastrcnn_loss", record)
    saved = {k: v.clone() for k, v in heads.state_dict().items()}
    with torch.no_grad():
        for p in heads.box_predictor:
            p.bbox_pred.weight.zero_()
            p.bbox_pred.bias.zero_()
    heads.train()
    try:
        _, losses = heads(_features(), [PROPOSALS.clone()], [(SIZE, SIZE)], [_target()])
    finally:
        heads.load_state_dict(saved)
    return seen, losses


def test_stages_use_their_own_iou_thresholds(model, monkeypatch):
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert [(m.low_threshold, m.high_threshold, m.allow_low_quality_matches) for m in heads.stage_matchers] == [
        (0.5, 0.5, False), (0.6, 0.6, False), (0.7, 0.7, False)]
    assert heads.proposal_matcher is heads.stage_matchers[0]  # torchvision's sampling at stage 0
    assert [c.weights for c in heads.stage_coders] == list(cascade.STAGE_WEIGHTS)
    gt_labels = [torch.ones(1, dtype=torch.int64)]
    for stage, want in enumerate(STAGE_LABELS):  # the labelling function, on the proposals alone
        _, labels = heads.label_stage(stage, [PROPOSALS], [GT], gt_labels)
        assert labels[0].tolist() == want[:-1], stage
    seen, losses = _train_labels(heads, monkeypatch)  # and through a training pass
    assert [lab.tolist() for lab in seen] == STAGE_LABELS
    assert all(torch.isfinite(v) for v in losses.values())
    with_drop_loss(model, 0.01)  # DropLoss, every stage: the proposal missing GT is ignored, the others stay
    try:
        assert model.roi_heads is heads and heads.iou_threshold == 0.01
        seen, _ = _train_labels(heads, monkeypatch)
        want = [[IGNORE_INDEX if i == 4 else v for i, v in enumerate(row)] for row in STAGE_LABELS]
        assert [lab.tolist() for lab in seen] == want
    finally:
        with_drop_loss(model, 0)
    assert heads.iou_threshold == 0.0


def test_training_step_losses_and_gradients(model):
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    target = {"boxes": torch.tensor([[12., 10., 50., 40.]]), "labels": torch.ones(1, dtype=torch.int64),
              "masks": masks}
    losses = model([image], [target])
    stage_keys = {f"loss_{k}_s{s}" for k in ("classifier", "box_reg") for s in range(3)}
    assert set(losses) == stage_keys | {"loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for stage, (head, pred) in enumerate(zip(model.roi_heads.box_head, model.roi_heads.box_predictor)):
        for name, p in [*head.named_parameters(), *pred.named_parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), (stage, name)
        assert pred.cls_score.weight.grad.abs().sum() > 0, stage
        assert head.fc6.weight.grad.abs().sum() > 0, stage
        if losses[f"loss_box_reg_s{stage}"] > 0:
            assert pred.bbox_pred.weight.grad.abs().sum() > 0, stage
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_inference_shapes_and_mean_of_stage_scores(model):
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])[0]
    n = len(out["boxes"])
    assert n >= 1 and out["boxes"].shape == (n, 4) and out["labels"].shape == out["scores"].shape == (n,)
    assert out["labels"].dtype == torch.int64 and out["masks"].shape == (n, 1, 64, 80)
    heads = model.roi_heads
    saved = heads.score_thresh, heads.nms_thresh
    heads.score_thresh, heads.nms_thresh = 0.0, 1.0  # keep every proposal's detection
    feats, shapes = _features(1), [(SIZE, SIZE)]
    proposals = torch.tensor([[5., 5., 60., 70.], [40., 20., 120., 90.], [10., 50., 50., 120.], [0., 0., 127., 127.]])
    try:
        with torch.no_grad():
            got = heads(feats, [proposals], shapes)[0][0]
            boxes, probs = [proposals], []
            for t in range(3):  # the stages by hand: each scores its own input boxes
                if t:
                    boxes = [box_ops.clip_boxes_to_image(
                        heads.stage_coders[t - 1].decode(deltas, boxes).reshape(-1, 4), shapes[0])]
                logits, deltas = heads.box_predictor[t](heads.box_head[t](heads.box_roi_pool(feats, boxes, shapes)))
                probs.append(F.softmax(logits, -1)[:, 1])
            final = box_ops.clip_boxes_to_image(heads.stage_coders[2].decode(deltas, boxes).reshape(-1, 4), shapes[0])
    finally:
        heads.score_thresh, heads.nms_thresh = saved
    mean = torch.stack(probs).mean(0)
    order = mean.argsort(descending=True)
    assert torch.allclose(got["scores"], mean[order], atol=1e-6)
    assert torch.allclose(got["boxes"], final[order], atol=1e-4)
    assert not torch.allclose(got["scores"], probs[2][order], atol=1e-6)  # not the last stage's alone
    assert got["masks"].shape == (4, 1, 28, 28)  # pasted into the image by the model's transform


def test_r50_preset_builds_with_mask_r50_fpn_backbone(tmp_path):
    assert "cascade_mask_r50_fpn" in PRESETS and "cascade_mask_r50_fpn" in MASK_PRESETS
    assert "cascade_mask_r50_fpn" not in RANDOM_ONLY and "cascade_mask_mobilenet_fpn" in RANDOM_ONLY
    assert DetectorSettings("cascade_mask_r50_fpn").masks
    cascade_model = build_detector("cascade_mask_r50_fpn", 1, init="random", **SMALL)
    mask_model = build_detector("mask_r50_fpn", 1, init="random", **SMALL)
    assert isinstance(cascade_model.roi_heads, CascadeRoIHeads)

    def backbone(m):
        return {k: v.shape for k, v in m.state_dict().items() if k.startswith(("backbone.", "rpn."))}

    assert backbone(cascade_model) == backbone(mask_model)
    assert cascade_model.roi_heads.box_head[2].fc6.in_features == 256 * 7 * 7
    sd = {k: v for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    sd["layer4.2.conv3.weight"] = torch.randn_like(sd["layer4.2.conv3.weight"])
    torch.save(sd, tmp_path / "dino.pth")
    dino = build_detector("cascade_mask_r50_fpn", 1, init="dino", weights=str(tmp_path / "dino.pth"), **SMALL)
    assert torch.equal(dino.state_dict()["backbone.body.layer4.2.conv3.weight"], sd["layer4.2.conv3.weight"])
    boxes_only = build_detector("cascade_r50_fpn", 1, init="random", **SMALL)   # Cascade R-CNN without masks
    assert isinstance(boxes_only.roi_heads, CascadeRoIHeads) and not boxes_only.roi_heads.has_mask()
    assert not DetectorSettings("cascade_r50_fpn").masks and backbone(boxes_only) == backbone(cascade_model)
