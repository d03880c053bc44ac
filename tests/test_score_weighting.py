"""Score weighting (CuVLER's soft-target loss): scores 1 give torchvision's losses to the bit; known scores give the
hand-computed losses (soft cross-entropy with probability targets, weighted smooth-L1 and BCE, written naively)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

from pipeline.detection.builders import build_detector
from pipeline.detection.droploss import DropLossRoIHeads, with_drop_loss
from pipeline.detection.recipe import TrainRecipe
from pipeline.detection.score_weighting import (ScoreWeightedRoIHeads, weighted_fastrcnn_loss,
                                                weighted_maskrcnn_loss, with_score_weighting)

SIZE = 64
GT = torch.tensor([[0., 0., 20., 20.], [30., 30., 60., 60.]])
PROPOSALS = torch.tensor([[0., 0., 20., 20.], [10., 0., 30., 20.], [19., 19., 29., 29.], [40., 0., 60., 20.],
                          [30., 30., 60., 50.], [25., 25., 35., 35.], [59., 59., 64., 64.]])


@pytest.fixture(scope="module")
def model():
    return build_detector("mask_mobilenet_fpn", 1, min_size=SIZE, max_size=96)


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


def _losses(heads, target) -> dict:
    heads.train()
    torch.manual_seed(0)  # the fg/bg sampler's draws
    _, losses = heads(_features(), [PROPOSALS.clone()], [(SIZE, SIZE)], [target])
    return losses


def _weighted(model, tau=0.0):
    m = type(model).__new__(type(model))
    m.__dict__.update(model.__dict__)
    m._modules = dict(model._modules)
    m = with_drop_loss(with_score_weighting(m), tau)
    assert isinstance(m.roi_heads, ScoreWeightedRoIHeads) and model.roi_heads is not m.roi_heads
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


def test_recipe_and_refusals():
    assert TrainRecipe().score_weighting is False and "score_weighting" not in TrainRecipe().recorded()
    assert TrainRecipe(score_weighting=True).recorded() == {"score_weighting": True}
    cascade = build_detector("cascade_mask_mobilenet_fpn", 1, min_size=SIZE, max_size=96)
    with pytest.raises(ValueError, match="score_weighting"):
        with_score_weighting(cascade)
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
