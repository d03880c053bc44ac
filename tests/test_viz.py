"""Pictures: title fonts with the glyphs of non-ASCII names, a readable component, detections in viz/."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.viz import style
from pipeline.viz.mining import draw_mining


def test_title_font_has_the_glyphs_of_non_ascii_names():
    text = "Zürich_ÉtéЖ"
    font = style.font_for(text)
    if style.missing_glyphs(font, text):
        pytest.skip("no font with these glyphs on this machine (install fonts-dejavu-core or set LOST_FONT)")
    assert style.missing_glyphs(font, text) == []
    # Pillow's built-in font (what the titles used) draws them as its missing-glyph box
    assert "ü" in style.missing_glyphs(style.default_font(), text)
    # and what is drawn differs from that box
    a = style.draw_title(Image.new("RGB", (200, 24)), "ü")
    box = Image.new("RGB", (200, 24))
    d = ImageDraw.Draw(box)
    d.rectangle([0, 0, 200, 24], fill=style.TITLE_BG)
    d.text((4, 2), "\u0378", fill=style.TITLE_FG, font=font)
    assert np.any(np.asarray(a)[:18, :20] != np.asarray(box)[:18, :20])


def test_missing_glyph_detection_and_fallback():
    f = style.default_font()
    assert style.has_glyph(f, "a") and style.has_glyph(f, " ")
    assert not style.has_glyph(f, "\u0378")
    assert style.font_for("abc") is not None  # some font always comes back


def test_title_band_fits_the_text():
    img = style.draw_title(Image.new("RGB", (400, 60), (200, 200, 200)), "000005  lost")
    a = np.asarray(img)
    assert tuple(a[1, 1]) == style.TITLE_BG and tuple(a[50, 300]) == (200, 200, 200)
    assert (a[:20, :60] == 255).any()  # white text drawn on the band


def test_component_shading_is_readable():
    """Inside vs outside the mined component must differ clearly (was a 25% white tint: 32 grey levels)."""
    ps, img = 8, np.full((32, 48, 3), 128, np.uint8)
    mask = np.zeros((4, 6), bool)
    mask[1:3, 1:4] = True
    res = SimpleNamespace(mask=mask, similars=None, seed=None, box=np.array([0, 0, 1, 1]))
    a = np.asarray(draw_mining(img, res, ps)).astype(int)
    inside = a[8 + 4:24 - 4, 8 + 4:32 - 4]          # away from the outline
    outside = a[28:, 36:]
    assert abs(inside.mean() - outside.mean()) >= 60
    # the component is outlined: its border pixels are COMPONENT
    assert tuple(a[8, 16]) == style.COMPONENT and tuple(a[16, 8]) == style.COMPONENT


def test_detection_pictures_live_in_viz(tmp_path):
    import importlib.util

    from pipeline.viz import detections

    assert importlib.util.find_spec("pipeline.detection.pictures") is None  # one home for pictures: viz/
    p = tmp_path / "im.png"
    Image.new("RGB", (40, 30), (0, 0, 0)).save(p)
    rec = SimpleNamespace(coco_id=3, image_id="été", path=str(p), has_gt=False, boxes=np.zeros((0, 4)))
    dets = [{"image_id": 3, "boxes": np.array([[20.0, 10, 40, 30]]), "scores": np.array([0.9])}]
    out = detections.write_detection_pictures(dets, [rec], tmp_path / "pics", note="RANDOM WEIGHTS")
    assert [x.name for x in out] == ["été.png"]
    with Image.open(out[0]) as im:
        assert im.text["Title"] == "été  RANDOM WEIGHTS"
        # a 30 px picture is too short for its title over it: the title is a band above it
        assert tuple(np.asarray(im.convert("RGB"))[style.TITLE_BAND + 20, 20]) == style.PRED


def test_gallery_title_is_not_cut_off(tmp_path):
    from pipeline.viz.gallery import cluster_gallery

    title = "cluster_9 (id 10) (123 boxes)  RANDOM WEIGHTS: not a result"
    p = cluster_gallery([np.zeros((10, 10, 3), np.uint8)], tmp_path / "g.png", title, thumb=32)
    with Image.open(p) as im:
        assert im.text["Title"] == title
        width = im.width
    font = style.font_for(title, 13)
    assert width >= ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)
