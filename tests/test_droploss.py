"""DropLoss (CutLER Eq. 1, pipeline/detection/droploss.py): weights, the loss against torchvision's and against a
naive reference, and the swap of a built detector's RoI heads."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from pipeline.detection.builders import build_detector
from pipeline.detection.droploss import IGNORE_INDEX, DropLossRoIHeads, drop_loss_weights, with_drop_loss

TAU = 0.01
SIZE = 64
GT = torch.tensor([[0., 0., 20., 20.], [30., 30., 60., 60.]])
# proposals and their best IoU with GT, by hand: (intersection area) / (union area)
PROPOSALS = torch.tensor([
    [0., 0., 20., 20.],    # = GT 0: 1
    [10., 0., 30., 20.],   # GT 0: 200 / (400 + 400 - 200) = 1/3; GT 1: no overlap
    [19., 19., 29., 29.],  # GT 0: 1 / (400 + 100 - 1) = 1/499; GT 1: none            -> dropped
    [40., 0., 60., 20.],   # no overlap with either: 0                                -> dropped
    [30., 30., 60., 50.],  # GT 1: 600 / 900 = 2/3 (foreground)
    [25., 25., 35., 35.],  # GT 1: 25 / (900 + 100 - 25) = 1/39; GT 0: none
    [59., 59., 64., 64.],  # GT 1: 1 / (900 + 25 - 1) = 1/924                         -> dropped
])
BEST_IOU = [1.0, 1 / 3, 1 / 499, 0.0, 2 / 3, 1 / 39, 1 / 924]
# torchvision's sampled RoIs for one image: every proposal, then the GT boxes it adds (IoU 1, foreground); with so
# few of them, all are sampled, in index order. Class targets by torchvision's matcher (IoU >= 0.5: foreground)
LABELS = torch.tensor([1, 0, 0, 0, 1, 0, 0, 1, 1])
KEPT = torch.tensor([v > TAU for v in BEST_IOU] + [True, True])


@pytest.fixture(scope="module")
def model():
    return build_detector("mobilenet_fpn", 1, min_size=SIZE, max_size=96)


def _features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0": torch.randn(1, 256, 8, 8, generator=g), "1": torch.randn(1, 256, 4, 4, generator=g)}


def _run(heads: RoIHeads, proposals: torch.Tensor, seed: int = 0):
    """The heads' training losses on one image and the box predictor's class logits (gradient kept)."""
    seen = {}

    def keep(module, inputs, outputs):
        outputs[0].retain_grad()
        seen["logits"], seen["regression"] = outputs

    handle = heads.box_predictor.register_forward_hook(keep)
    heads.train()
    torch.manual_seed(seed)  # the fg/bg sampler's draws
    try:
        _, losses = heads(_features(), [proposals.clone()], [(SIZE, SIZE)],
                          [{"boxes": GT.clone(), "labels": torch.ones(len(GT), dtype=torch.int64)}])
    finally:
        handle.remove()
    return losses, seen["logits"], seen["regression"]


def test_weights_equal_the_hand_computed_ones():
    hand = torch.tensor(BEST_IOU)
    for tau in (TAU, 0.3, 0.5):
        (w,) = drop_loss_weights([PROPOSALS], [GT], tau)
        assert w.tolist() == (hand > tau).float().tolist(), tau
    assert drop_loss_weights([PROPOSALS], [GT], TAU)[0].tolist() == [1, 1, 0, 0, 1, 1, 0]
    # two images, the second without GT boxes (kept whole); off: all ones
    w = drop_loss_weights([PROPOSALS, PROPOSALS[:3]], [GT[1:], torch.zeros(0, 4)], TAU)
    assert w[0].tolist() == [0, 0, 0, 0, 1, 1, 0] and w[1].tolist() == [1, 1, 1]
    for off in (None, 0, 0.0):
        assert drop_loss_weights([PROPOSALS], [GT], off)[0].tolist() == [1.0] * len(PROPOSALS)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError):
            drop_loss_weights([PROPOSALS], [GT], bad)


def test_sampled_targets_of_dropped_rois_are_ignored(model):
    heads = DropLossRoIHeads.from_roi_heads(model.roi_heads, TAU)
    targets = [{"boxes": GT.clone(), "labels": torch.ones(2, dtype=torch.int64)}]
    torch.manual_seed(0)
    props, _, labels, _ = heads.select_training_samples([PROPOSALS.clone()], targets)
    assert torch.equal(props[0], torch.cat([PROPOSALS, GT]))
    assert labels[0].tolist() == torch.where(KEPT, LABELS, IGNORE_INDEX).tolist()


def test_loss_is_torchvisions_when_nothing_is_dropped(model):
    plain = model.roi_heads
    above = PROPOSALS[torch.tensor(BEST_IOU) > TAU]
    drop = DropLossRoIHeads.from_roi_heads(plain, TAU)
    for heads, props in ((drop, above), (DropLossRoIHeads.from_roi_heads(plain, 0), PROPOSALS),
                         (DropLossRoIHeads.from_roi_heads(plain, None), PROPOSALS)):
        want, got = _run(plain, props)[0], _run(heads, props)[0]
        assert want.keys() == got.keys() == {"loss_classifier", "loss_box_reg"}
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_dropped_rois_leave_the_classification_loss(model):
    plain_losses, _, _ = _run(model.roi_heads, PROPOSALS)
    losses, logits, regression = _run(DropLossRoIHeads.from_roi_heads(model.roi_heads, TAU), PROPOSALS)
    # naive reference: the mean cross-entropy over the kept RoIs
    per_roi = [-torch.log_softmax(logits[i], 0)[LABELS[i]] for i in range(len(LABELS)) if KEPT[i]]
    assert torch.allclose(losses["loss_classifier"], torch.stack(per_roi).mean(), atol=1e-6)
    assert not torch.allclose(losses["loss_classifier"], plain_losses["loss_classifier"])
    assert torch.allclose(plain_losses["loss_classifier"], F.cross_entropy(logits, LABELS), atol=1e-6)
    # box regression: torchvision's, on the same (foreground) RoIs and normaliser
    _, want_box = fastrcnn_loss(logits, regression, [LABELS], [_regression_targets(model.roi_heads)])
    assert torch.allclose(losses["loss_box_reg"], want_box, atol=1e-6)
    assert torch.equal(losses["loss_box_reg"], plain_losses["loss_box_reg"])
    losses["loss_classifier"].backward()
    grad_norm = logits.grad.abs().sum(1)
    assert (grad_norm[~KEPT] == 0).all() and (grad_norm[KEPT] > 0).all()


def _regression_targets(heads: RoIHeads) -> torch.Tensor:
    matched = GT[[0, 0, 0, 0, 1, 1, 1, 0, 1]]  # each sampled RoI's best GT box (index 0 where none overlaps)
    return heads.box_coder.encode_single(matched, torch.cat([PROPOSALS, GT]))


def test_with_drop_loss_keeps_the_state_dict_and_settings(model):
    m = copy.deepcopy(model)
    before = m.state_dict()
    old = m.roi_heads
    assert with_drop_loss(m, 0) is m and m.roi_heads is old  # off: untouched
    assert with_drop_loss(m, TAU) is m
    heads, after = m.roi_heads, m.state_dict()
    assert type(heads) is DropLossRoIHeads and heads.iou_threshold == TAU and type(old) is RoIHeads
    assert list(after) == list(before)
    for k in before:
        assert after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr(), k
        assert torch.equal(after[k], before[k]), k
    for name, sub in old.named_children():
        assert getattr(heads, name) is sub
    for name in ("score_thresh", "nms_thresh", "detections_per_img"):
        assert getattr(heads, name) == getattr(old, name)
    assert vars(heads.proposal_matcher) == vars(old.proposal_matcher)
    assert vars(heads.fg_bg_sampler) == vars(old.fg_bg_sampler)
    assert heads.box_coder.weights == old.box_coder.weights
    assert heads._modules is not old._modules
    assert with_drop_loss(m, None).roi_heads is heads and heads.iou_threshold == 0.0


def test_with_drop_loss_trains_a_whole_detector():
    """A mask detector end to end: every loss but the box classifier's is torchvision's, and it is finite."""
    m = build_detector("mask_mobilenet_fpn", 1, min_size=SIZE, max_size=96)
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    mask[0, 30:60, 30:60] = 1
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))]
    targets = [{"boxes": GT[1:].clone(), "labels": torch.ones(1, dtype=torch.int64), "masks": mask}]

    def losses():
        m.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return m(images, targets)

    plain = losses()
    with_drop_loss(m, TAU)
    assert m.roi_heads.has_mask()
    drop = losses()
    assert drop.keys() == plain.keys()
    for k in plain:
        if k != "loss_classifier":
            assert torch.equal(drop[k], plain[k]), k
    assert torch.isfinite(drop["loss_classifier"])
    assert not torch.equal(drop["loss_classifier"], plain["loss_classifier"])  # some RoIs were dropped


def test_with_drop_loss_refuses_what_it_cannot_swap(model):
    class Custom(RoIHeads):
        pass

    m = copy.deepcopy(model)
    m.roi_heads.__class__ = Custom
    with pytest.raises(TypeError):
        with_drop_loss(m, TAU)
    with pytest.raises(TypeError):
        with_drop_loss(torch.nn.Linear(1, 1), TAU)
    with pytest.raises(ValueError):
        with_drop_loss(copy.deepcopy(model), 1.5)
