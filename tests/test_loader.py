"""load_image on every awkward file kind (made on the fly), and the mining DataLoader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import ImageLoadError, ImageRecord, MiningImages, collate_single, load_image

RNG = np.random.default_rng(0)


def _rgb(h=12, w=20):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, a)


def test_grayscale(tmp_path):
    g = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (9, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_palette(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    img.putdata([0, 1, 1, 0, 1, 0, 0, 1])
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 128, 255]
    assert out[1, 3].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    white, red = load_image(tmp_path / "c.jpg"), load_image(tmp_path / "red.jpg")
    assert white.shape == (8, 16, 3) and white.dtype == np.uint8
    assert white.min() >= 250
    assert (red[:, :, 0] >= 250).all() and (red[:, :, 1:] <= 5).all()


def test_rgba_alpha_dropped_not_composited(tmp_path):
    a = np.zeros((3, 4, 4), np.uint8)
    a[..., :3] = [10, 200, 30]
    a[0, 0, 3] = 255  # one opaque pixel, the rest fully transparent
    Image.fromarray(a, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (3, 4, 3)
    assert (out.reshape(-1, 3) == [10, 200, 30]).all()  # compositing on black would give 0 here
    la = Image.fromarray(np.stack([np.full((2, 2), 77, np.uint8), np.zeros((2, 2), np.uint8)], -1), mode="LA")
    la.save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == 77).all()


def test_16bit_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_image(tmp_path / "d.png")
    assert out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_32bit_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    assert load_image(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_not_applied(tmp_path):
    img = Image.fromarray(_rgb(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg").shape == (10, 30, 3)  # as stored, like the reference


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "t.jpg"
    Image.fromarray(_rgb(64, 64)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"truncated image .*t\.jpg.*re-download"):
        load_image(p)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # restored


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "n.jpg").write_text("hello, I am text")
    with pytest.raises(ImageLoadError, match=r"not an image file .*n\.jpg"):
        load_image(tmp_path / "n.jpg")
    with pytest.raises(ImageLoadError, match=r"image not found: .*gone\.png"):
        load_image(tmp_path / "gone.png")


def test_smaller_than_a_patch(tmp_path):
    Image.fromarray(_rgb(8, 20)).save(tmp_path / "s.png")
    assert load_image(tmp_path / "s.png", min_size=8).shape == (8, 20, 3)
    with pytest.raises(ImageLoadError, match=r"s\.png is 20x8 pixels .*smaller than one patch \(16 px\)"):
        load_image(tmp_path / "s.png", min_size=16)


def _records(tmp_path):
    Image.fromarray(_rgb(20, 33)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.fromarray(_rgb(5, 40)).save(tmp_path / "tiny.png")
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "ok2.png")
    names = ["ok.png", "bad.jpg", "tiny.png", "ok2.png"]
    return [ImageRecord(n, i + 1, str(tmp_path / n), has_gt=False) for i, n in enumerate(names)]


def test_mining_images_returns_errors(tmp_path):
    recs = _records(tmp_path)
    ds = MiningImages(recs, patch_size=16)
    assert len(ds) == 4
    it = ds[0]
    assert it["index"] == 0 and it["record"] is recs[0] and it["error"] is None and it["size"] == (20, 33)
    img = it["image"]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 32, 48)
    assert (img[:, 20:, :] == 0).all() and (img[:, :, 33:] == 0).all()  # zero padding bottom/right
    raw = load_image(recs[0].path)
    expect = (raw[0, 0, 0] / 255 - 0.485) / 0.229
    assert float(img[0, 0, 0]) == pytest.approx(expect, abs=1e-5)
    for i, what in [(1, "bad.jpg"), (2, "tiny.png")]:
        e = ds[i]
        assert e["image"] is None and e["size"] is None and e["index"] == i and what in e["error"]
    sub = MiningImages(recs, 16, indices=[3, 1])
    assert [sub[0]["index"], sub[1]["index"]] == [3, 1] and sub[0]["image"].shape == (3, 16, 16)
    with pytest.raises(IndexError):
        MiningImages(recs, 16, indices=[4])


def test_dataloader_two_workers(tmp_path):
    recs = _records(tmp_path)
    loader = torch.utils.data.DataLoader(MiningImages(recs, 16), batch_size=1, num_workers=2,
                                         collate_fn=collate_single)
    items = list(loader)
    assert [it["index"] for it in items] == [0, 1, 2, 3]
    assert [it["error"] is None for it in items] == [True, False, False, True]
    assert items[0]["record"].image_id == "ok.png" and items[3]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_single([items[0], items[3]])


def test_try_decode_and_one_decoder(tmp_path):
    from pipeline.data import decode_chw_float, decode_rgb, try_decode
    from pipeline.data.images import load_image as old_name

    assert old_name is decode_rgb is load_image
    a = _rgb(6, 9)
    Image.fromarray(a).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    img, err = try_decode(tmp_path / "ok.png")
    assert err is None and (img == a).all()
    for name, why in [("bad.jpg", "not an image file"), ("gone.png", "image not found")]:
        img, err = try_decode(tmp_path / name)
        assert img is None and why in err and name in err
    img, err = try_decode(tmp_path / "ok.png", min_size=8)
    assert img is None and "smaller than one patch" in err
    t = decode_chw_float(tmp_path / "ok.png")
    assert t.shape == (3, 6, 9) and t.dtype == torch.float32
    assert torch.allclose(t, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_image_paths_and_common_root(tmp_path):
    from pipeline.data import common_root, records_root, resolve_image_path

    assert resolve_image_path("a/b.jpg", tmp_path) == tmp_path / "a/b.jpg"
    assert resolve_image_path(str(tmp_path / "x.jpg"), "/elsewhere") == tmp_path / "x.jpg"
    assert str(resolve_image_path("b.jpg", None)) == "b.jpg"
    paths = [tmp_path / "a" / "1.jpg", tmp_path / "a" / "b" / "2.jpg", tmp_path / "c" / "3.jpg"]
    assert common_root(paths) == str(tmp_path) and common_root([]) == ""
    assert common_root(paths[:2]) == str(tmp_path / "a")
    recs = [ImageRecord(str(i), i, str(p), has_gt=False) for i, p in enumerate(paths[:2])]
    assert records_root(recs) == str(tmp_path / "a")


def test_mining_images_max_side(tmp_path):
    from pipeline.data.loader import box_to_original, resize_max_side

    a = _rgb(30, 100)
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(_rgb(20, 24)).save(tmp_path / "small.png")
    recs = [ImageRecord(n, i + 1, str(tmp_path / n), has_gt=False) for i, n in enumerate(["wide.png", "small.png"])]
    off = MiningImages(recs, 8)[0]
    assert off["size"] == off["original_size"] == (30, 100) and off["scale"] == 1.0  # default: parity
    ds = MiningImages(recs, 8, max_side=50)
    it = ds[0]
    assert it["original_size"] == (30, 100) and it["size"] == (15, 50) and it["scale"] == 0.5
    assert it["image"].shape == (3, 16, 56)  # padded after resizing
    expect = np.asarray(Image.fromarray(a).resize((50, 15), Image.BICUBIC))
    assert (resize_max_side(a, 50) == expect).all()
    norm = (expect[0, 0, 0] / 255 - 0.485) / 0.229
    assert float(it["image"][0, 0, 0]) == pytest.approx(norm, abs=1e-5)
    small = ds[1]
    assert small["size"] == small["original_size"] == (20, 24) and small["scale"] == 1.0  # fits: untouched
    np.testing.assert_allclose(box_to_original([5, 3, 50, 15], it["size"], it["original_size"]), [10, 6, 100, 30])
    with pytest.raises(ValueError, match="smaller than one patch"):
        MiningImages(recs, 16, max_side=8)
    Image.fromarray(_rgb(8, 200)).save(tmp_path / "thin.png")
    thin = MiningImages([ImageRecord("t", 1, str(tmp_path / "thin.png"), has_gt=False)], 8, max_side=100)[0]
    assert thin["image"] is None and "Raise max_side" in thin["error"]
