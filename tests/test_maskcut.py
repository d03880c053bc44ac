"""MaskCut (no CRF): planted multi-object features, the corner prior, the stop rule, fallbacks and errors."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.discovery.maskcut import count_corners, mask_iou, maskcut, orient_maskcut
from pipeline.discovery.tokencut import CutResult, tokencut

H_, W_, DIM = 12, 16, 16
# (y0, y1, x0, x1), exclusive ends; three different sizes so the cuts have distinct eigenvalues
RECTS = [(1, 4, 2, 7), (7, 11, 1, 4), (4, 10, 9, 14)]


def planted_objects(rects, h=H_, w=W_, dim=DIM, noise=0.02, seed=0):
    """Orthonormal directions: background 0, object k+1 on rects[k]; Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, : len(rects) + 1].T
    lab = torch.zeros(h, w, dtype=torch.long)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        lab[y0:y1, x0:x1] = k + 1
    return dirs[lab.flatten()] + noise * torch.randn(h * w, dim, generator=g), lab.numpy()


def rect_box(r, p=16):
    y0, y1, x0, x1 = r
    return [float(x0 * p), float(y0 * p), float(x1 * p), float(y1 * p)]


def test_three_planted_objects_give_three_boxes_at_the_planted_places():
    F, lab = planted_objects(RECTS)
    res = maskcut(F, (H_, W_), 16, (H_ * 16, W_ * 16))
    assert isinstance(res, CutResult) and not res.degenerate and res.stop == "num_objects"
    # discovery order: the largest object first (its cut has the smallest normalized-cut cost), then 15, 12
    order = [2, 0, 1]
    assert [b.tolist() for b in res.boxes] == [rect_box(RECTS[k]) for k in order]
    for m, k in zip(res.masks, order):
        assert (m == (lab == k + 1)).all()
    assert [int(lab.ravel()[s]) for s in res.seeds] == [k + 1 for k in order]
    assert res.seed == res.seeds[0] and res.box.tolist() == res.boxes[0].tolist() and res.mask is res.masks[0]
    assert len(res.scores) == 3 and all(0.99 < s <= 1.0 for s in res.scores)
    # the first cut separates all objects from the background; its mask is the seed's component only
    assert (res.bipartition == (lab > 0)).all() and (res.eigvec[lab > 0] > res.eigvec[lab == 0].max()).all()
    # asking for more objects: nothing new is left after the third, the loop stops early
    more = maskcut(F, (H_, W_), 16, (H_ * 16, W_ * 16), num_objects=6)
    assert [b.tolist() for b in more.boxes] == [b.tolist() for b in res.boxes]
    assert more.stop in ("empty", "overlap")
    # and fewer: the first one only
    one = maskcut(F, (H_, W_), 16, (H_ * 16, W_ * 16), num_objects=1)
    assert [b.tolist() for b in one.boxes] == [rect_box(RECTS[2])] and one.stop == "num_objects"


def test_boxes_are_clipped_to_the_unpadded_image():
    F, _ = planted_objects(RECTS)
    res = maskcut(F, (H_, W_), 16, (H_ * 16 - 40, W_ * 16 - 30), num_objects=1)  # H = 152, W = 226
    assert res.boxes[0].tolist() == [144.0, 64.0, 224.0, 152.0]


def test_one_object_stops_after_it():
    F, lab = planted_objects([RECTS[2]])
    res = maskcut(F, (H_, W_), 16, (H_ * 16, W_ * 16))
    # stage 1 cuts the zeroed object off the background again: the same mask, IoU 1 > 0.5 -> stop
    assert len(res.boxes) == 1 and res.stop == "overlap"
    assert res.box.tolist() == rect_box(RECTS[2]) and (res.mask == (lab == 1)).all()


def test_tiny_second_object_is_rejected_and_stops():
    h = w = 12
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[2:7, 2:8] = 1
    lab[9, 9] = 2  # 1 of 144 patches <= 1 %
    F = torch.eye(3)[lab.flatten()] + 0.01 * torch.randn(h * w, 3, generator=torch.Generator().manual_seed(1))
    res = maskcut(F, (h, w), 16, (192, 192))
    assert [b.tolist() for b in res.boxes] == [[32.0, 32.0, 128.0, 112.0]] and res.stop == "small"


def test_corner_prior_reverses_a_foreground_holding_the_corners():
    # 8x8: a 1-patch ring (28 patches) around a 6x6 centre (36). The ring is the smaller side, so it holds
    # max |v| (TokenCut takes it: whole-image box); it holds all 4 corners, so MaskCut takes the centre.
    h = w = 8
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[1:-1, 1:-1] = 1
    F = torch.eye(2)[lab.flatten()]
    assert tokencut(F, (h, w), 16, (128, 128)).box.tolist() == [0.0, 0.0, 128.0, 128.0]
    res = maskcut(F, (h, w), 16, (128, 128))
    assert res.boxes[0].tolist() == [16.0, 16.0, 112.0, 112.0] and (res.bipartition == (lab == 1).numpy()).all()
    assert len(res.boxes) == 1 and res.stop == "overlap"


@pytest.mark.parametrize("case", ["ring", "three"])
def test_result_does_not_depend_on_the_eigenvector_sign(monkeypatch, case):
    if case == "ring":
        lab = torch.zeros(8, 8, dtype=torch.long)
        lab[1:-1, 1:-1] = 1
        F, dims = torch.eye(2)[lab.flatten()], (8, 8)
    else:
        F, _ = planted_objects(RECTS)
        dims = (H_, W_)
    size = (dims[0] * 16, dims[1] * 16)
    plain = maskcut(F, dims, 16, size)
    eigh = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", lambda *a, **k: (lambda r: (r[0], -r[1]))(eigh(*a, **k)))
    flipped = maskcut(F, dims, 16, size)
    assert [b.tolist() for b in flipped.boxes] == [b.tolist() for b in plain.boxes]
    assert flipped.seeds == plain.seeds and flipped.stop == plain.stop
    assert all((a == b).all() for a, b in zip(flipped.masks, plain.masks))
    np.testing.assert_array_equal(flipped.eigvec, plain.eigvec)


def test_orient_maskcut_hand_cases():
    # 2x3 grid, v row-major. mean 0. max |v| at patch 5 (+0.9): side {v > 0} = {0, 2, 5} holds corners
    # (0,0), (0,2), (1,2) -> 3 corners -> reversed: foreground {1, 3, 4}, seed = argmax(-v) = 3 (first of
    # the tied -0.5 at patches 3 and 4 is 3... patch 1 is -0.1)
    v = np.array([0.2, -0.1, 0.3, -0.5, -0.8, 0.9])
    v = v - v.mean()
    o, part, seed = orient_maskcut(v, 2, 3)
    assert part.tolist() == [[False, True, False], [True, True, False]] and seed == 4
    np.testing.assert_array_equal(o, -v)
    # max |v| on the small side with <= 2 corners: TokenCut's flip only; seed = argmax of the oriented v
    v = np.array([-0.1, -0.1, -0.1, -0.1, 0.2, 0.2])  # side {4, 5}: corners (1,2) only; tie -> seed 4
    o, part, seed = orient_maskcut(v, 2, 3)
    assert part.tolist() == [[False, False, False], [False, True, True]] and seed == 4
    o, part, seed = orient_maskcut(-v, 2, 3)  # other sign: flipped back, same answer
    assert part.tolist() == [[False, False, False], [False, True, True]] and seed == 4
    np.testing.assert_array_equal(o, v)


def test_helpers():
    g = np.zeros((3, 4), dtype=bool)
    g[0, 0] = g[2, 3] = True
    assert count_corners(g) == 2 and count_corners(np.ones((1, 1), dtype=bool)) == 4
    a, b = np.zeros((2, 2), dtype=bool), np.zeros((2, 2), dtype=bool)
    assert np.isnan(mask_iou(a, b))
    a[0] = True
    b[:, 0] = True
    assert mask_iou(a, b) == pytest.approx(1 / 3)


def test_first_box_equals_tokencut_when_the_corner_prior_does_not_apply():
    rng = np.random.default_rng(3)
    compared = 0
    for trial in range(12):
        h, w = [(6, 7), (8, 9), (5, 11)][trial % 3]
        y0, x0 = int(rng.integers(1, h - 2)), int(rng.integers(1, w - 2))
        rect = (y0, int(rng.integers(y0 + 1, h)), x0, int(rng.integers(x0 + 1, w)))
        F, _ = planted_objects([rect], h=h, w=w, dim=8, noise=0.1, seed=trial)
        t = tokencut(F, (h, w), 16, (h * 16, w * 16), tau=0.15)
        if t.degenerate or count_corners(t.bipartition) >= 3:
            continue
        m = maskcut(F, (h, w), 16, (h * 16, w * 16), num_objects=1)
        assert m.box.tolist() == t.box.tolist() and (m.bipartition == t.bipartition).all()
        compared += 1
    assert compared >= 8


def test_degenerate_first_cut_falls_back_to_the_whole_image():
    for F in (torch.ones(12, 4), torch.zeros(12, 4), torch.randn(1, 2, 4)):
        n = F.shape[-2]
        dims = (3, 4) if n == 12 else (1, 2)
        res = maskcut(F, dims, 16, (40, 50))
        assert res.degenerate and res.stop == "degenerate" and len(res.boxes) == 1
        assert res.box.tolist() == [0.0, 0.0, 50.0, 40.0] and res.score == 0.0 and res.mask.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_objects=0), "num_objects"),
        (dict(num_objects=1.5), "num_objects"),
        (dict(tau=1.5), "tau"),
        (dict(eps=0), "eps"),
        (dict(dims=(4, 4)), "dims"),
        (dict(feats=torch.full((12, 4), float("inf"))), "NaN or inf"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(feats=torch.randn(12, 4), dims=(3, 4), patch_size=16, image_size=(40, 60)) | kwargs
    with pytest.raises(ValueError, match=match):
        maskcut(**args)


def test_draw_cut_with_several_boxes():
    from pipeline.viz.cut import draw_cut

    F, _ = planted_objects(RECTS)
    res = maskcut(F, (H_, W_), 16, (H_ * 16 - 7, W_ * 16 - 9))
    pic = draw_cut(np.zeros((H_ * 16 - 7, W_ * 16 - 9, 3), dtype=np.uint8), res, 16, title="maskcut")
    from pipeline.viz import style
    from pipeline.viz.cut import panel_zoom

    k = panel_zoom(H_ * 16 - 7, W_ * 16 - 9)  # small panels are enlarged by a whole factor (readable)
    assert k == 2 and pic.size == (3 * (W_ * 16 - 9) * k + 12, (H_ * 16 - 7) * k + style.LEGEND_BAND)
    # the first box is drawn in red on the left panel (its bottom edge; the seed square may touch the top)
    x1, y2 = int(res.box[0]), int(res.box[3])
    assert pic.getpixel((k * (x1 + 20), k * y2 - 1)) == (255, 40, 40)
