"""Score weighting (CuVLER's soft-target loss): scores 1 give torchvision's losses to the bit; known scores give the
hand-computed losses (soft cross-entropy with probability targets, weighted smooth-L1 and BCE, written naively)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.ops import box_iou

from pipeline.detection.builders import build_detector
from pipeline.detection.droploss import DropLossRoIHeads, with_drop_loss
from pipeline.detection.recipe import TrainRecipe
import pipeline.detection.score_weighting as score_weighting
from pipeline.detection.score_weighting import (ScoreWeightedCascadeRoIHeads, ScoreWeightedRoIHeads,
                                                weighted_fastrcnn_loss, weighted_maskrcnn_loss, with_score_weighting)

SIZE = 64
GT = torch.tensor([[0., 0., 20., 20.], [30., 30., 60., 60.]])
PROPOSALS = torch.tensor([[0., 0., 20., 20.], [10., 0., 30., 20.], [19., 19., 29., 29.], [40., 0., 60., 20.],
                          [30., 30., 60., 50.], [25., 25., 35., 35.], [59., 59., 64., 64.]])


@pytest.fixture(scope="module")
def model():
    return build_detector("mask_mobilenet_fpn", 1, min_size=SIZE, max_size=96)


@pytest.fixture(scope="module")
def cascade_model():
    return build_detector("cascade_mask_mobilenet_fpn", 1, min_size=SIZE, max_size=96)


def _features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"0": torch.randn(1, 256, 8, 8, generator=g), "1": torch.randn(1, 256, 4, 4, generator=g)}


def _target(scores=None) -> dict:
    masks = torch.zeros(len(GT), SIZE, SIZE, dtype=torch.uint8)
    masks[0, 2:18, 2:18] = 1
    masks[1, 32:58, 31:60] = 1
    t = {"boxes": GT.clone(), "labels": torch.ones(len(GT), dtype=torch.int64), "masks": masks}
    if scores is not None:
        t["scores"] = torch.tensor(scores, dtype=torch.float32)
    return t


def _losses(heads, target, proposals=PROPOSALS) -> dict:
    heads.train()
    torch.manual_seed(0)  # the fg/bg sampler's draws
    _, losses = heads(_features(), [proposals.clone()], [(SIZE, SIZE)], [target])
    return losses


def _weighted(model, tau=0.0, cls=ScoreWeightedRoIHeads):
    """``model``'s heads with score weighting and DropLoss at ``tau`` (a shallow copy: ``model``'s are unchanged)."""
    m = type(model).__new__(type(model))
    m.__dict__.update(model.__dict__)
    m._modules = dict(model._modules)
    keys = set(m.state_dict())
    m = with_drop_loss(with_score_weighting(m), tau)
    assert type(m.roi_heads) is cls and model.roi_heads is not m.roi_heads and set(m.state_dict()) == keys
    assert with_score_weighting(m).roi_heads is m.roi_heads  # twice: unchanged
    return m.roi_heads


@pytest.mark.parametrize("tau", [0.0, 0.01])
def test_scores_of_one_give_the_unweighted_losses_exactly(model, tau):
    plain = model.roi_heads if tau == 0 else DropLossRoIHeads.from_roi_heads(model.roi_heads, tau)
    expected = _losses(plain, _target())
    heads = _weighted(model, tau)
    for target in (_target([1.0, 1.0]), _target()):  # explicit ones, and a file without scores
        got = _losses(heads, target)
        assert set(got) == {"loss_classifier", "loss_box_reg", "loss_mask"}
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_scores_change_the_losses(model):
    heads = _weighted(model)
    one, half = _losses(heads, _target([1.0, 1.0])), _losses(heads, _target([0.5, 0.5]))
    assert half["loss_box_reg"].item() == pytest.approx(0.5 * one["loss_box_reg"].item(), rel=1e-6)
    assert half["loss_mask"].item() == pytest.approx(0.5 * one["loss_mask"].item(), rel=1e-6)
    assert half["loss_classifier"] != one["loss_classifier"]


def test_hand_built_case():
    """Four RoIs (two foreground, of pseudo-boxes with scores 0.25 and 0.8; two background), two classes."""
    logits = torch.tensor([[0.2, 1.0, -0.5], [1.5, 0.1, 0.3], [0.0, -1.0, 2.0], [0.4, 0.4, 0.4]], dtype=torch.float64)
    labels = [torch.tensor([1, 0]), torch.tensor([2, 0])]
    reg = torch.linspace(-1, 1, 4 * 12, dtype=torch.float64).reshape(4, 12)
    targets = [torch.tensor([[0.1, 0.0, -0.2, 0.05], [0, 0, 0, 0]]), torch.tensor([[0.3, -0.1, 0.0, 0.2],
                                                                                      [0, 0, 0, 0]])]
    targets = [t.to(torch.float64) for t in targets]
    weights = [torch.tensor([0.25, 1.0], dtype=torch.float64), torch.tensor([0.8, 1.0], dtype=torch.float64)]
    cls, box = weighted_fastrcnn_loss(logits, reg, labels, targets, weights)
    # soft targets: RoI 0 -> (bg 0.75, class1 0.25), RoI 2 -> (bg 0.2, class2 0.8); RoIs 1, 3 -> background
    probs = torch.tensor([[0.75, 0.25, 0], [1, 0, 0], [0.2, 0, 0.8], [1, 0, 0]], dtype=torch.float64)
    hand_cls = sum(-(probs[i] * torch.log_softmax(logits[i], 0)).sum() for i in range(4)) / 4
    assert cls.item() == pytest.approx(hand_cls.item(), rel=1e-12)

    def sl1(x, y, beta=1 / 9):
        d = abs(x - y)
        return 0.5 * d * d / beta if d < beta else d - 0.5 * beta
    r = reg.reshape(4, 3, 4)
    hand_box = (0.25 * sum(sl1(r[0, 1, j].item(), targets[0][0, j].item()) for j in range(4))
                + 0.8 * sum(sl1(r[2, 2, j].item(), targets[1][0, j].item()) for j in range(4))) / 4
    assert box.item() == pytest.approx(hand_box, rel=1e-12)


def test_hand_built_mask_loss():
    fg = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[-0.3, 0.7], [1.0, -2.0]]], dtype=torch.float64)
    logits = torch.stack([torch.full_like(fg, 9.0), fg], dim=1)  # (2 RoIs, 2 classes: background, object, 2, 2)
    boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)]
    gt = [torch.tensor([[[1, 0], [1, 1]], [[0, 1], [0, 0]]], dtype=torch.uint8)]
    loss = weighted_maskrcnn_loss(logits, boxes, gt, [torch.tensor([1, 1])], [torch.tensor([0, 1])],
                                  [torch.tensor([0.5, 1.0])])

    def bce(x, y):
        return -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x)))
    t = project_masks_on_boxes(gt[0], boxes[0], torch.tensor([0, 1]), 2).to(torch.float64)  # torchvision's targets
    hand = (0.5 * bce(fg[0], t[0]).sum() + 1.0 * bce(fg[1], t[1]).sum()) / 8
    assert loss.item() == pytest.approx(hand.item(), rel=1e-9)


def test_recipe_and_model_conversion(cascade_model):
    assert TrainRecipe().score_weighting is False and "score_weighting" not in TrainRecipe().recorded()
    assert TrainRecipe(score_weighting=True).recorded() == {"score_weighting": True}
    heads = _weighted(cascade_model, 0.01, ScoreWeightedCascadeRoIHeads)  # the Cascade head: every stage weighted
    assert heads.iou_threshold == 0.01 and heads.box_head is cascade_model.roi_heads.box_head
    assert heads.stage_matchers[2] is cascade_model.roi_heads.stage_matchers[2]
    assert heads.proposal_matcher is heads.stage_matchers[0] and heads.box_coder is heads.stage_coders[0]
    m = build_detector("mobilenet_fpn", 1, min_size=SIZE, max_size=96)
    assert type(m.roi_heads) is RoIHeads
    keys = set(m.state_dict())
    with_score_weighting(m)
    assert isinstance(m.roi_heads, ScoreWeightedRoIHeads) and set(m.state_dict()) == keys


def test_copy_paste_carries_scores():
    from pipeline.detection.copy_paste import copy_paste

    img = torch.zeros(3, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0, :2, :2] = 1
    masks[1, 5:, 5:] = 1
    dest = {"boxes": torch.tensor([[0., 0., 2., 2.], [5., 5., 8., 8.]]), "labels": torch.ones(2, dtype=torch.int64),
            "masks": masks, "scores": torch.tensor([1.0, 0.5])}
    src = {"boxes": torch.tensor([[0., 0., 2., 2.]]), "labels": torch.ones(1, dtype=torch.int64),
           "masks": masks[:1].clone(), "scores": torch.tensor([0.25])}
    # the source's object pasted over the destination's first: that one is removed, its score with it
    _, out = copy_paste(img, dest, img, src, scale=1.0, offset=(0, 0))
    assert out["scores"].tolist() == [0.5, 0.25] and len(out["boxes"]) == 2


# ------------------------------------------------------------------------------------------------ the Cascade head
STAGE_KEYS = [(f"loss_classifier_s{t}", f"loss_box_reg_s{t}") for t in range(3)]


@pytest.mark.parametrize("tau", [0.0, 0.01])
def test_cascade_scores_of_one_give_the_unweighted_losses_exactly(cascade_model, tau):
    with_drop_loss(cascade_model, tau)  # the plain cascade, DropLoss per stage at tau
    try:
        expected = _losses(cascade_model.roi_heads, _target())
    finally:
        with_drop_loss(cascade_model, 0)
    heads = _weighted(cascade_model, tau, ScoreWeightedCascadeRoIHeads)
    assert set(expected) == {k for pair in STAGE_KEYS for k in pair} | {"loss_mask"}
    for target in (_target([1.0, 1.0]), _target()):  # explicit ones, and a file without scores
        got = _losses(heads, target)
        assert set(got) == set(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_cascade_scores_weight_every_stage(cascade_model):
    """Score s on every pseudo-box: each stage's box loss and the mask loss are s times the unweighted ones (the
    same RoIs in every stage: the weights do not change the forward pass), and each stage's class loss is affine in
    s, ``L(s) = L(1) + (1 - s) D`` (D: that stage's sum of log p(class) - log p(bg) over its foreground RoIs, over
    the RoIs kept), so ``L(0.25) - L(1) = 3 (L(0.75) - L(1))``."""
    heads = _weighted(cascade_model, 0.0, ScoreWeightedCascadeRoIHeads)
    one, q1, q3 = (_losses(heads, _target([s, s])) for s in (1.0, 0.25, 0.75))
    for cls, box in STAGE_KEYS:
        assert one[box] > 0 and q1[box] != one[box] and q1[cls] != one[cls], box
        assert torch.allclose(q1[box], 0.25 * one[box], rtol=1e-6, atol=0), box
        assert torch.allclose(q3[box], 0.75 * one[box], rtol=1e-6, atol=0), box
        assert torch.allclose(q1[cls] - one[cls], 3 * (q3[cls] - one[cls]), rtol=1e-4, atol=1e-7), cls
    assert torch.allclose(q1["loss_mask"], 0.25 * one["loss_mask"], rtol=1e-6, atol=0)


def test_cascade_stage_weights_are_the_scores_of_that_stages_matches(cascade_model, monkeypatch):
    """Scores 0.5 / 0.25 on the two pseudo-boxes; stage 0's regressor shifts every box right by 0.4 of its width
    (the later stages' keep them), so the box [18, 30, 48, 60] (IoU 0.43 with the second pseudo-box: background at
    stage 0) becomes [30, 30, 60, 60] (foreground at stages 1 and 2). Each stage's weights of its foreground boxes
    are the scores of the pseudo-boxes they best overlap (IoU >= 0.5 / 0.6 / 0.7), from that stage's boxes."""
    heads = _weighted(cascade_model, 0.0, ScoreWeightedCascadeRoIHeads)
    boxes, seen = [], []
    run_stage, loss = heads.run_stage, score_weighting.weighted_fastrcnn_loss
    monkeypatch.setattr(heads, "run_stage", lambda t, f, b, s: boxes.append(b[0]) or run_stage(t, f, b, s))
    monkeypatch.setattr(score_weighting, "weighted_fastrcnn_loss",
                        lambda *a: seen.append((torch.cat(a[2]), torch.cat(a[4]))) or loss(*a))
    saved = {k: v.clone() for k, v in heads.state_dict().items()}
    with torch.no_grad():
        for p in heads.box_predictor:
            p.bbox_pred.weight.zero_()
            p.bbox_pred.bias.zero_()
        heads.box_predictor[0].bbox_pred.bias[0] = 4.0  # dx = 4 / 10 (stage 0's coder weight)
    try:
        _losses(heads, _target([0.5, 0.25]), torch.cat([PROPOSALS, torch.tensor([[18., 30., 48., 60.]])]))
    finally:
        heads.load_state_dict(saved)
    assert len(boxes) == len(seen) == 3
    for t, (b, (labels, weights)) in enumerate(zip(boxes, seen)):
        best, idx = box_iou(GT, b).max(dim=0)
        fg = best >= (0.5, 0.6, 0.7)[t]
        assert torch.equal(labels > 0, fg), t
        assert weights[fg].tolist() == torch.tensor([0.5, 0.25])[idx[fg]].tolist(), t
    moved = (seen[0][0] == 0) & (seen[1][0] > 0)  # background at stage 0, foreground at stage 1
    assert moved.any() and set(seen[1][1][moved].tolist()) == {0.25}


def test_cascade_training_step_with_drop_loss(cascade_model):
    from pipeline.detection.run import with_recipe

    m = type(cascade_model).__new__(type(cascade_model))
    m.__dict__.update(cascade_model.__dict__)
    m._modules = dict(cascade_model._modules)
    m, _ = with_recipe(TrainRecipe(score_weighting=True, drop_loss_iou=0.01), m, None, seed=0)
    assert type(m.roi_heads) is ScoreWeightedCascadeRoIHeads and m.roi_heads.iou_threshold == 0.01
    m.train()
    m.zero_grad()
    torch.manual_seed(0)
    target = _target([0.7, 0.4])
    losses = m([torch.rand(3, SIZE, SIZE)], [target])
    assert set(losses) == {k for pair in STAGE_KEYS for k in pair} | {"loss_mask", "loss_objectness",
                                                                          "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for t, pred in enumerate(m.roi_heads.box_predictor):
        assert pred.cls_score.weight.grad.abs().sum() > 0, t
    assert m.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    m.zero_grad()
