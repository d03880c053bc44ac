"""Every picture survives any box and any image size (issue 20), and says what its colours mean.

Boxes come from models and files: sub-pixel, zero-size, inverted, partly or wholly outside the image,
NaN/inf. Images come down to 1 x 1 (also 1 x N, N x 1). Every drawing path (mining, cut panels, detections,
the report's worst-image pictures, cluster galleries, contact sheets) goes through
:mod:`pipeline.viz.boxes`; these tests drive each entry point with each kind of box on each size, check
that nothing raises, that the right boxes are counted as skipped, and that a valid box still colours the
pixels where it is.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.viz import style
from pipeline.viz.boxes import draw_box, draw_boxes, pixel_rect
from pipeline.viz.cut import MIN_PANEL, draw_cut, eigvec_heatmap, panel_zoom
from pipeline.viz.detections import draw_detections, write_detection_pictures
from pipeline.viz.gallery import cluster_gallery, thumbnail, write_cluster_galleries
from pipeline.viz.mining import contact_sheet, draw_mining, upsample_grid

NAN, INF = float("nan"), float("inf")
SIZES = [(1, 1), (1, 7), (7, 1), (20, 30)]  # (width, height)
BG = (128, 128, 128)


def drawable(W, H) -> dict[str, list[float]]:
    """Boxes that must be drawn on a W x H image, each covering the pixel (0, 0)."""
    return {"sub-pixel": [0.2, 0.1, 0.7, 0.6], "zero-size": [0, 0, 0, 0], "inverted": [W, H, 0, 0],
            "partly outside": [-5, -5, 1, 1], "whole image": [0, 0, W, H], "beyond every side": [-9, -9, W + 9, H + 9]}


def undrawable(W, H) -> dict[str, list[float]]:
    """Boxes with nothing to draw on a W x H image: skipped and counted."""
    return {"nan": [NAN, 0, 1, 1], "inf": [0, 0, INF, 1], "-inf": [-INF, 0, 1, 1],
            "right of the image": [W + 1, 0, W + 5, H], "above the image": [0, -9, W, -1],
            "zero-size on the far edge": [W, H, W, H]}


def all_boxes(W, H) -> np.ndarray:
    return np.array([*drawable(W, H).values(), *undrawable(W, H).values()], dtype=np.float64)


N_SKIPPED = len(undrawable(1, 1))


def canvas(W, H) -> Image.Image:
    return Image.new("RGB", (W, H), BG)


def px(img, x, y):
    return tuple(int(v) for v in np.asarray(img.convert("RGB"))[y, x])


def colours(a: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in a.reshape(-1, 3)}


def legend_colours(pic: Image.Image) -> set[tuple[int, int, int]]:
    """The colours in the legend line (the bottom band) of a finished picture."""
    return colours(np.asarray(pic.convert("RGB"))[-style.LEGEND_BAND:])


# --------------------------------------------------------------------------- the box drawer itself
def test_pixel_rect_normalises_every_kind_of_box():
    size = (20, 30)
    assert pixel_rect([20, 10, 40, 30], (40, 30)) == (20, 10, 39, 29)   # x2/y2 exclusive, as before
    assert pixel_rect([5.2, 7.1, 5.7, 7.4], size) == (5, 7, 5, 7)        # sub-pixel: the pixel it touches
    assert pixel_rect([4.9, 7, 5.1, 8], size) == (4, 7, 5, 7)            # straddles two columns
    assert pixel_rect([3, 3, 3, 3], size) == (3, 3, 3, 3)                # zero-size: its pixel
    assert pixel_rect([12, 25, 2, 5], size) == (2, 5, 11, 24)            # inverted: corners sorted
    assert pixel_rect([-5, -5, 3, 100], size) == (0, 0, 2, 29)           # clipped to the image
    assert pixel_rect([1e300, 0, -1e300, 1], size) == (0, 0, 19, 0)      # huge but finite
    for box in undrawable(*size).values():
        assert pixel_rect(box, size) is None, box
    assert pixel_rect([None, 0, 1, 1], size) is None                     # a JSON null


@pytest.mark.parametrize("W,H", SIZES)
def test_draw_box_each_kind(W, H):
    for name, box in drawable(W, H).items():
        img = canvas(W, H)
        assert draw_box(img, box, style.PRED, width=3) is not None, name
        assert px(img, 0, 0) == style.PRED, name
    for name, box in undrawable(W, H).items():
        img = canvas(W, H)
        assert draw_box(img, box, style.PRED, width=3, label="0.99") is None, name
        assert colours(np.asarray(img)) == {BG}, name  # nothing drawn, not even the label
    img = canvas(W, H)
    assert draw_boxes(img, all_boxes(W, H), style.GT, width=50, labels=["x"] * len(all_boxes(W, H))) == N_SKIPPED
    assert px(img, W - 1, H - 1) == style.GT  # the whole-image box reaches the far corner
    assert draw_boxes(img, None, style.GT) == 0 and draw_boxes(img, np.zeros((0, 4)), style.GT) == 0


def test_draw_box_draws_only_inside_its_rectangle():
    """A line wider than the box fills the box; it never spills out (PIL's wide outline on a narrow
    rectangle paints pixels beside it)."""
    img = canvas(10, 10)
    assert draw_box(img, [2, 2, 4, 9], style.PRED, width=3) == (2, 2, 3, 8)
    a = np.asarray(img)
    inside = np.zeros((10, 10), bool)
    inside[2:9, 2:4] = True
    assert (a[inside] == style.PRED).all() and (a[~inside] == BG).all()
    # a large box keeps an outline of the asked width and its inside untouched
    img = canvas(20, 30)
    draw_box(img, [2, 2, 12, 12], style.PRED, width=3)
    assert px(img, 2, 2) == px(img, 4, 4) == px(img, 11, 11) == style.PRED
    assert px(img, 5, 5) == px(img, 1, 1) == px(img, 12, 12) == BG
    # a sub-pixel box inside a larger image colours its one pixel and nothing around it
    img = canvas(20, 30)
    draw_box(img, [5.2, 7.1, 5.7, 7.4], style.PRED, width=3)
    a = np.asarray(img)
    assert px(img, 5, 7) == style.PRED and (a != BG).any(axis=2).sum() == 1


# --------------------------------------------------------------------------- mining pictures
def _lost_like(W, H, box, patch=16, with_mask=True):
    gh, gw = math.ceil(H / patch), math.ceil(W / patch)
    mask = np.ones((gh, gw), bool) if with_mask else None
    return SimpleNamespace(box=np.asarray(box, dtype=np.float64), mask=mask, seed=gh * gw - 1,
                           similars=np.arange(gh * gw) if with_mask else None)


@pytest.mark.parametrize("W,H", SIZES)
def test_draw_mining_any_box_any_size(W, H):
    img = np.full((H, W, 3), 128, np.uint8)
    gt = all_boxes(W, H)
    for box in [*drawable(W, H).values(), *undrawable(W, H).values()]:
        for with_mask in (True, False):
            pic = draw_mining(img, _lost_like(W, H, box, with_mask=with_mask), 16, gt_boxes=gt, title="000001  lost")
            assert pic.info["skipped_boxes"] == N_SKIPPED + (pixel_rect(box, (W, H)) is None)
    # the predicted box colours its corner (no mask: nothing drawn over it; no title: the picture at (0, 0))
    pic = draw_mining(img, _lost_like(W, H, [0.3, 0.3, 0.6, 0.6], with_mask=False), 16)
    assert px(pic, 0, 0) == style.PRED and pic.info["skipped_boxes"] == 0


def test_mining_masks_on_images_smaller_than_a_patch():
    """A 5 x 3 image with patch 16 has one (padded) patch; the mask, its outline, the expansion and the seed
    are cropped to the image. A grid smaller than the image is zero-padded."""
    assert upsample_grid(np.array([[True]]), 16, 3, 5).shape == (3, 5)
    up = upsample_grid(np.array([[1.5]]), 16, 40, 40)
    assert up[15, 15] == 1.5 and up[16, 0] == up[39, 39] == 0
    for H, W in ((1, 1), (3, 5), (5, 3), (1, 7), (7, 1)):
        pic = draw_mining(np.full((H, W, 3), 200, np.uint8), _lost_like(W, H, [0, 0, W, H]), 16)
        assert pic.size == (max(W, pic.width), H + style.LEGEND_BAND) and pic.width > 100  # legend: widened
        assert px(pic, 0, 0) == px(pic, W - 1, H - 1) == style.SEED  # the one patch is the seed, drawn last
    # a 1 x 1 grid on a 40 x 40 image: the patch is the component (tinted), the rest of the image dimmed
    big = draw_mining(np.full((40, 40, 3), 200, np.uint8), _lost_like(5, 5, [0, 0, 16, 16]), 16)
    assert big.size[1] == 40 + style.LEGEND_BAND and px(big, 39, 39) == (90, 90, 90)
    tint = tuple(int(v) for v in np.clip(0.45 * 200 + 0.55 * np.float32(style.EXPANSION), 0, 255))
    assert px(big, 8, 8) == tint


# --------------------------------------------------------------------------- cut panels
def _cut_like(W, H, boxes, patch=16):
    gh, gw = math.ceil(H / patch), math.ceil(W / patch)
    rng = np.random.default_rng(0)
    boxes = [np.asarray(b, dtype=np.float64) for b in boxes]
    return SimpleNamespace(box=boxes[0], boxes=boxes, seed=gh * gw - 1, eigvec=rng.standard_normal((gh, gw)),
                           bipartition=np.ones((gh, gw), bool), mask=np.ones((gh, gw), bool))


@pytest.mark.parametrize("W,H", SIZES)
def test_draw_cut_any_box_any_size(W, H):
    img = np.full((H, W, 3), 128, np.uint8)
    gt = all_boxes(W, H)
    res = _cut_like(W, H, [[0, 0, W, H], *all_boxes(W, H)])
    pic = draw_cut(img, res, 16, gt_boxes=gt, title="000001  maskcut  RANDOM WEIGHTS")
    assert pic.info["skipped_boxes"] == 2 * N_SKIPPED  # the later boxes and the GT (counted once)
    for first in undrawable(W, H).values():
        pic = draw_cut(img, _cut_like(W, H, [first]), 16, gt_boxes=None, title="t")
        assert pic.info["skipped_boxes"] == 1
    # no title: the first panel at (0, 0); the whole-image box is red there unless the seed patch (drawn
    # after it) covers it, as the only patch of an image smaller than one
    pic = draw_cut(img, _cut_like(W, H, [[0, 0, W, H]]), 16)
    assert px(pic, 0, 0) == (style.SEED if max(W, H) <= 16 else style.PRED)


def test_cut_panels_keep_a_readable_size():
    """Small images are enlarged by a whole factor (nearest-neighbour) to >= MIN_PANEL on the shorter side;
    large ones keep their size; the first box is drawn where it is, scaled."""
    W, H = 30, 20
    k = panel_zoom(H, W)
    assert k == math.ceil(MIN_PANEL / 20) and panel_zoom(300, 250) == 1 and panel_zoom(1, 1) == MIN_PANEL
    assert panel_zoom(1, 100000) == 1  # never enlarged into a huge strip
    img = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    # seed in the last patch, first box in the top left: its corners are red on the first panel
    pic = draw_cut(img, _cut_like(W, H, [[1, 1, 10, 10]]), 16)
    assert pic.width == 3 * W * k + 2 * 6 and pic.height == H * k + style.LEGEND_BAND
    assert min(W * k, H * k) >= MIN_PANEL
    assert px(pic, k, k) == style.PRED and px(pic, 10 * k - 1, 10 * k - 1) == style.PRED
    # nearest-neighbour: each image pixel is a k x k block of the bipartition panel (tinted, not blurred)
    part = np.asarray(pic)[: H * k, 2 * (W * k + 6): 3 * W * k + 12].astype(int)
    tinted = np.clip(0.45 * img[3, 20].astype(np.float32) + 0.55 * np.float32(style.EXPANSION), 0, 255).astype(int)
    assert (part[3 * k:4 * k, 20 * k:21 * k] == tinted).all()
    big = draw_cut(np.zeros((240, 250, 3), np.uint8), _cut_like(250, 240, [[0, 0, 10, 10]]), 16)
    assert big.size == (3 * 250 + 12, 240 + style.LEGEND_BAND)  # not enlarged


def test_eigvec_heatmap_smaller_than_a_patch():
    assert eigvec_heatmap(np.array([[0.5]]), 16, (1, 1)).shape == (1, 1, 3)
    hm = eigvec_heatmap(np.array([[-1.0, NAN]]), 16, (3, 20))
    assert hm.shape == (3, 20, 3) and tuple(hm[0, 0]) == style.NEGATIVE and tuple(hm[0, 19]) == style.ZERO


# --------------------------------------------------------------------------- detections
@pytest.mark.parametrize("W,H", SIZES)
def test_draw_detections_any_box_any_size(W, H):
    img = np.full((H, W, 3), 128, np.uint8)
    boxes = all_boxes(W, H)
    pic = draw_detections(img, boxes, np.full(len(boxes), 0.9), gt_boxes=boxes, max_boxes=len(boxes),
                          title="000001  RANDOM WEIGHTS")
    assert pic.info["skipped_boxes"] == 2 * N_SKIPPED
    assert pic.width >= W and pic.height > H
    pic = draw_detections(img, [[0.2, 0.2, 0.6, 0.6]], [0.9])  # sub-pixel top detection, no title
    assert px(pic, 0, 0) == style.PRED and pic.info["skipped_boxes"] == 0


def test_sub_pixel_detection_is_drawn_in_the_written_picture(tmp_path):
    """The reported crash: a detection narrower than one pixel killed write_detection_pictures
    (``ValueError: x1 must be greater than or equal to x0`` in ``ImageDraw.rectangle``)."""
    p = tmp_path / "im.png"
    Image.new("RGB", (20, 30), BG).save(p)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), BG).save(one)
    recs = [SimpleNamespace(coco_id=1, image_id="sub", path=str(p), has_gt=True, boxes=np.array([[3.0, 3, 3, 3]])),
            SimpleNamespace(coco_id=2, image_id="tiny", path=str(one), has_gt=False, boxes=np.zeros((0, 4)))]
    dets = [{"image_id": 1, "boxes": np.array([[5.2, 7.1, 5.7, 7.4], [NAN, 0, 1, 1]]), "scores": np.array([0.9, 0.8])},
            {"image_id": 2, "boxes": np.array([[0.4, 0.4, 0.4, 0.4]]), "scores": np.array([0.5])}]
    out = write_detection_pictures(dets, recs, tmp_path / "pics")
    assert [x.name for x in out] == ["sub.png", "tiny.png"]
    with Image.open(out[0]) as im:
        top = style.TITLE_BAND  # a 30 px picture is too short for the title over it: the title is above
        assert im.size == (max(20, im.width), top + 30 + style.LEGEND_BAND)
        assert px(im, 5, top + 7) == style.PRED and px(im, 6, top + 7) == BG and px(im, 3, top + 3) == style.GT
    with Image.open(out[1]) as im:
        assert px(im, 0, style.TITLE_BAND) == style.PRED and im.text["Title"] == "tiny"


# --------------------------------------------------------------------------- the report's pictures
@pytest.mark.parametrize("W,H", SIZES)
def test_report_draw_any_box_any_size(tmp_path, W, H):
    from pipeline.report.build import _draw

    p = tmp_path / "im.png"
    Image.new("RGB", (W, H), BG).save(p)
    boxes = all_boxes(W, H)
    for box in boxes:
        pic = _draw(p, box.tolist(), boxes, "000001  IoU 0.00")
        assert pic.info["skipped_boxes"] == N_SKIPPED + (pixel_rect(box, (W, H)) is None)
    assert _draw(p, None, None, "x").info["skipped_boxes"] == 0
    pic = _draw(p, [0.5, 0.5, 0.5, 0.5], None, "")
    assert px(pic, 0, 0) == style.PRED and style.PRED in legend_colours(pic)


# --------------------------------------------------------------------------- galleries, sheets, titles
def test_cluster_thumbnails_of_tiny_and_empty_crops(tmp_path):
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert colours(np.asarray(thumbnail(red, 16))) == {(255, 0, 0)}          # 1 x 1 fills the tile
    for shape in ((0, 5, 3), (5, 0, 3), (0, 0, 3)):
        assert colours(np.asarray(thumbnail(np.zeros(shape, np.uint8), 16))) == {(128, 128, 128)}
    strips = [np.full((1, 7, 3), 200, np.uint8), np.full((7, 1, 3), 200, np.uint8)]
    for s in strips:
        assert thumbnail(s, 16).size == (16, 16) and (200, 200, 200) in colours(np.asarray(thumbnail(s, 16)))
    crops = [red, np.zeros((0, 4, 3), np.uint8), *strips]
    assert Image.open(cluster_gallery(crops, tmp_path / "g1.png", "cluster_0 (id 1)", thumb=1)).height > 18
    with Image.open(cluster_gallery(crops, tmp_path / "g.png", "cluster_0 (id 1)", thumb=8)) as im:
        # tiles of 8 px after an 18 px title and 2 px padding: the 1 x 1 red crop fills the first, the
        # empty crop leaves the second grey
        assert px(im, 2 + 4, 20 + 4) == (255, 0, 0) and px(im, 12 + 4, 20 + 4) == (128, 128, 128)
    paths = write_cluster_galleries({0: crops, 1: [np.zeros((0, 0, 3), np.uint8)]}, tmp_path / "gal", thumb=8)
    assert [x.name for x in paths] == ["cluster_0.png", "cluster_1.png"]


def test_titles_sheets_and_pngs_of_1x1_pictures(tmp_path):
    one = Image.new("RGB", (1, 1), BG)
    assert style.draw_title(one, "000001  a long title") is one  # drawn over, clipped: no crash
    p = style.save_png(Image.new("RGB", (1, 1), (255, 0, 0)), tmp_path / "a.png", title="été")
    with Image.open(p) as im:
        assert im.size == (1, 1) and im.text["Title"] == "été"
    sheet = contact_sheet([p, p], tmp_path / "sheet.png", thumb=8)
    with Image.open(sheet) as im:
        assert im.size == (16, 8) and px(im, 3, 3) == px(im, 11, 3) == (255, 0, 0)  # 1 x 1, centred in its tile
    # the title of a tiny picture goes above it, whole; the picture itself is not covered
    fin = style.finish_picture(Image.new("RGB", (1, 1), BG), "000001  maskcut", [style.Key(style.PRED, "box", 2)])
    assert px(fin, 0, style.TITLE_BAND) == BG and fin.height == style.TITLE_BAND + 1 + style.LEGEND_BAND
    font = style.font_for("000001  maskcut")
    assert fin.width >= ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("000001  maskcut", font=font)


# --------------------------------------------------------------------------- legends
def test_every_picture_kind_has_a_legend_of_its_colours():
    W, H = 40, 30
    img = np.full((H, W, 3), 128, np.uint8)
    gt = [[2, 2, 20, 20]]
    lost = SimpleNamespace(box=np.array([0, 0, 16, 16.0]), mask=np.ones((2, 3), bool), seed=0,
                           similars=np.array([1, 2]))
    mining = legend_colours(draw_mining(img, lost, 16, gt_boxes=gt))
    assert {style.SEED, style.EXPANSION, style.COMPONENT, style.PRED, style.GT} <= mining
    assert style.GT not in legend_colours(draw_mining(img, lost, 16))  # no GT drawn, none in the legend
    cut = legend_colours(draw_cut(img, _cut_like(W, H, [[0, 0, 16, 16]]), 16, gt_boxes=gt))
    assert {style.NEGATIVE, style.ZERO, style.POSITIVE, style.EXPANSION, style.SEED, style.PRED, style.GT} <= cut
    det = draw_detections(img, [[0, 0, 10, 10]], [0.9], gt_boxes=gt)
    assert {style.PRED, style.GT} <= legend_colours(det)
    # the legend is never cut off: a 1 x 1 picture is widened to hold it
    tiny = draw_detections(np.zeros((1, 1, 3), np.uint8), [[0, 0, 1, 1]], [0.9], gt_boxes=[[0, 0, 1, 1]])
    assert tiny.width > 100 and {style.PRED, style.GT} <= legend_colours(tiny)


def test_mask_painter_survives_empty_odd_and_misfit_masks():
    from pipeline.viz.masks import PALETTE, tint_masks

    img = np.full((4, 5, 3), 100.0, np.float32)
    inner = np.zeros((4, 5), np.uint8)
    inner[1:3, 1:4] = 1
    assert tint_masks(img, [np.zeros((4, 5), bool), np.ones((3, 3), bool), inner]) == 1
    # the third mask is the one drawn (the empty one takes colour 0, the misfit is counted, not drawn)
    assert tuple(img[1, 1]) == tuple(float(v) for v in PALETTE[2])          # its outline, in its colour
    assert tuple(img[0, 0]) == (100.0, 100.0, 100.0)                        # outside it: untouched
    one = np.zeros((1, 1, 3), np.float32)
    assert tint_masks(one, [np.ones((1, 1), bool)]) == 0 and one.any()
