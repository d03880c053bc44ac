"""Dataset builders on the real test data (voc07-mini, coco-tiny, the COCO20k list; tests/data or
``LOST_SHARED_DATA``) and synthetic trees."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DEMO_IMAGES, VOC_CLASSES, DatasetError, build_dataset, load_image

IN_REPO_DATA = Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------------------- VOC
def test_voc07_mini_records(voc07_mini):
    ds = build_dataset("voc07", str(voc07_mini))
    assert len(ds) == 60 and ds.name == "voc07" and ds.class_names == VOC_CLASSES
    ids = (voc07_mini / "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt").read_text().split()
    assert [r.image_id for r in ds.records] == ids  # set-file order
    r = {r.image_id: r for r in ds.records}["000101"]
    # 000101.xml by hand: chair (difficult) 185 58 348 186; person 40 64 400 333; size 500 x 333
    np.testing.assert_array_equal(r.boxes, [[184, 57, 348, 186], [39, 63, 400, 333]])
    assert r.classes == ["chair", "person"]
    assert r.difficult.tolist() == [True, False] and r.crowd.tolist() == [False, False]
    assert (r.width, r.height, r.coco_id, r.has_gt) == (500, 333, 101, True)
    assert r.path.endswith("VOC2007/JPEGImages/000101.jpg") and Path(r.path).is_file()
    assert sum(len(x.boxes) for x in ds.records) > 60
    assert any(x.difficult.any() for x in ds.records if x.image_id != "000101")


def test_voc_boxes_match_every_xml(voc07_mini):
    import xml.etree.ElementTree as ET

    ds = build_dataset("voc07", str(voc07_mini))
    for r in ds.records:
        objs = ET.parse(voc07_mini / f"VOCdevkit/VOC2007/Annotations/{r.image_id}.xml").findall("object")
        raw = np.array([[int(o.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
                        for o in objs])
        np.testing.assert_array_equal(r.boxes, raw - [1, 1, 0, 0])
        assert r.difficult.tolist() == [o.find("difficult").text == "1" for o in objs]


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2007"])
def test_voc_root_variants(voc07_mini, sub):
    ds = build_dataset("voc07", str(voc07_mini / sub), max_images=5)
    assert [r.image_id for r in ds.records] == ["000024", "000101", "000232", "000241", "000381"]


def test_voc_wrong_root_message(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_dataset("voc07", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in msg and "root=" in msg
    assert "python -m pipeline.data.download voc07" in msg and "make " not in msg  # the library names no make target
    from stages.checks import in_config_keys  # the stage says it in config keys

    assert "Pass dataset.root=<the folder holding VOCdevkit/>" in in_config_keys(msg, "mine")
    with pytest.raises(DatasetError, match="voc12"):
        build_dataset("voc12", str(tmp_path))


def _voc_copy(voc07_mini, tmp_path, n=3) -> Path:
    src = voc07_mini / "VOCdevkit/VOC2007"
    dst = tmp_path / "VOCdevkit/VOC2007"
    ids = (src / "ImageSets/Main/trainval.txt").read_text().split()[:n]
    (dst / "ImageSets/Main").mkdir(parents=True)
    (dst / "Annotations").mkdir()
    (dst / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    for i in ids:
        shutil.copy(src / f"Annotations/{i}.xml", dst / f"Annotations/{i}.xml")
    return dst


def test_voc_missing_and_malformed_xml(voc07_mini, tmp_path):
    dst = _voc_copy(voc07_mini, tmp_path)
    (dst / "Annotations/000101.xml").unlink()
    with pytest.raises(DatasetError, match=r"annotation file missing: .*000101\.xml"):
        build_dataset("voc07", str(tmp_path))
    (dst / "Annotations/000101.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DatasetError, match=r"malformed VOC annotation .*000101\.xml"):
        build_dataset("voc07", str(tmp_path))
    (dst / "Annotations/000101.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"000101\.xml.*bndbox"):
        build_dataset("voc07", str(tmp_path))


def test_voc_missing_image_set_and_empty_annotation(voc07_mini, tmp_path):
    dst = _voc_copy(voc07_mini, tmp_path)
    with pytest.raises(DatasetError, match=r"image list not found: .*test\.txt.*trainval"):
        build_dataset("voc07", str(tmp_path), image_set="test")
    (dst / "Annotations/000101.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size></annotation>")
    with pytest.warns(UserWarning, match="1 of 3 images have no annotated object"):
        ds = build_dataset("voc07", str(tmp_path))
    r = ds.records[1]
    assert r.image_id == "000101" and r.boxes.shape == (0, 4) and (r.width, r.height) == (50, 40)


def test_voc12_ids(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets/Main/trainval.txt").write_text("2008_000008\n2012_004331\n")
    for i in ("2008_000008", "2012_004331"):
        (voc / f"Annotations/{i}.xml").write_text(
            "<annotation><size><width>10</width><height>8</height></size><object><name>horse</name>"
            "<difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>8</ymax>"
            "</bndbox></object></annotation>")
    ds = build_dataset("voc12", str(tmp_path))
    assert [r.coco_id for r in ds.records] == [2008000008, 2012004331]
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 1, 10, 8]])
    assert ds.records[0].path.endswith("VOC2012/JPEGImages/2008_000008.jpg")


# ----------------------------------------------------------------------------------------- COCO
def test_coco_tiny(coco_tiny):
    ds = build_dataset("coco", str(coco_tiny))
    raw = json.loads((coco_tiny / "annotations/instances_val2017.json").read_text())
    # the in-repo subset (16 images, 122 boxes) or the shared coco-tiny (80 images, one per category, 815 boxes)
    expected = (16, 122) if coco_tiny.is_relative_to(IN_REPO_DATA) else (80, 815)
    assert (len(raw["images"]), len(raw["annotations"])) == expected
    assert (len(ds), sum(len(r.boxes) for r in ds.records)) == expected
    assert [r.coco_id for r in ds.records] == sorted(im["id"] for im in raw["images"])
    assert len(ds.class_names) == 80 and ds.class_names[0] == "person"
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert sum(int(r.crowd.sum()) for r in ds.records) == len(crowd) > 0
    a = crowd[0]
    r = {x.coco_id: x for x in ds.records}[a["image_id"]]
    x, y, w, h = a["bbox"]
    k = [i for i, b in enumerate(r.boxes) if np.allclose(b, [x, y, x + w, y + h])]
    assert len(k) == 1 and r.crowd[k[0]]
    assert r.image_id == str(a["image_id"]) and Path(r.path).is_file()
    assert (r.width, r.height) == load_image(r.path).shape[1::-1]
    # explicit files give the same records
    ds2 = build_dataset("coco", "", ann_file=str(coco_tiny / "annotations/instances_val2017.json"),
                        image_dir=str(coco_tiny / "val2017"), max_images=3)
    assert [r.image_id for r in ds2.records] == [r.image_id for r in ds.records[:3]]


def test_coco_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"instances_val2017\.json"):
        build_dataset("coco", str(tmp_path), image_set="val2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations/instances_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"instances_val2017\.json has no 'images'"):
        build_dataset("coco", str(tmp_path))


def _tiny_train2014(root: Path, ids: list[int]) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 20, "height": 10} for i in ids]
    anns = [{"id": n, "image_id": i, "bbox": [1.5, 2, 3, 4], "category_id": 18, "iscrowd": int(n == 2)}
            for n, i in enumerate(ids, start=1)]
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    (root / "annotations/instances_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco20k_list_filtering(coco20k_list, tmp_path):
    real = coco20k_list.read_text().splitlines()
    from pipeline.data.coco import read_coco20k_list

    entries = read_coco20k_list(coco20k_list)
    # the in-repo file is the list's first 100 lines; the shared one is the whole list
    n = 100 if coco20k_list.is_relative_to(IN_REPO_DATA) else 19817
    assert len(real) == len(entries) == n
    assert [f"train2014/{base}" for _, base in entries] == real
    assert entries[0] == (560992, "COCO_train2014_000000560992.jpg")
    keep = [e[0] for e in entries[:3]]
    _tiny_train2014(tmp_path, keep[::-1] + [9, 10])  # json order differs; 9 and 10 are not in the list
    (tmp_path / "coco20k_filenames.txt").write_text("\n".join(real[:3]) + "\n")
    ds = build_dataset("coco20k", str(tmp_path))
    assert ds.name == "coco20k" and [r.coco_id for r in ds.records] == keep  # list order, others dropped
    assert ds.class_names == ["person", "dog"]
    r = ds.records[0]
    assert r.path == str(tmp_path / "train2014" / f"COCO_train2014_{keep[0]:012d}.jpg")
    np.testing.assert_array_equal(r.boxes, [[1.5, 2, 4.5, 6]])
    assert r.classes == ["dog"] and [x.crowd.tolist() for x in ds.records] == [[False], [True], [False]]
    # the real list against a json lacking most of it: one clear error
    with pytest.raises(DatasetError, match=rf"{n - 3} of {n} images of .*{re.escape(coco20k_list.name)} are not in"):
        build_dataset("coco20k", str(tmp_path), list_file=str(coco20k_list))
    with pytest.raises(DatasetError, match=r"COCO20k image list not found: .*nope\.txt"):
        build_dataset("coco20k", str(tmp_path), list_file=str(tmp_path / "nope.txt"))


def _coco_file(root: Path, anns: list[dict], cats=({"id": 1, "name": "dog"},)) -> Path:
    (root / "val").mkdir(parents=True, exist_ok=True)
    f = root / "instances_val.json"
    f.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "width": 20, "height": 10}],
                             "annotations": anns, "categories": list(cats)}))
    return f


def test_coco_unknown_category_names_the_annotation(tmp_path):
    f = _coco_file(tmp_path, [{"id": 1, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 1},
                              {"id": 5, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 999}])
    with pytest.raises(DatasetError, match=r"category_id 999 of annotation 5 \(image 7\) is not in the "
                                           r"file's categories \(ids \[1\]\)"):
        build_dataset("coco", "", ann_file=str(f), image_dir=str(tmp_path / "val"))
    f = _coco_file(tmp_path, [{"id": 3, "image_id": 7, "category_id": 1}])
    with pytest.raises(DatasetError, match=r"annotation 3 of image 7 has no bbox"):
        build_dataset("coco", "", ann_file=str(f), image_dir=str(tmp_path / "val"))


def test_coco_difficult_field(tmp_path):
    f = _coco_file(tmp_path, [{"id": 1, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 1, "difficult": 1},
                              {"id": 2, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 1, "ignore": 1},
                              {"id": 3, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 1, "iscrowd": 1},
                              {"id": 4, "image_id": 7, "bbox": [0, 0, 2, 2], "category_id": 1}])
    r = build_dataset("coco", "", ann_file=str(f), image_dir=str(tmp_path / "val")).records[0]
    assert r.difficult.tolist() == [True, True, False, False] and r.crowd.tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------------------- folder, demo
def test_folder_skips_hidden_files_and_folders(tmp_path):
    for rel in ["a.jpg", "._a.jpg", ".thumbs/t.png", "b/.c.png", "b/d.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3)).save(tmp_path / rel)
    ds = build_dataset("folder", str(tmp_path))
    assert [r.image_id for r in ds.records] == ["a.jpg", "b/d.png"]
    assert ds.skipped_hidden == 3
    only_hidden = tmp_path / "h"
    only_hidden.mkdir()
    Image.new("RGB", (4, 3)).save(only_hidden / "._x.jpg")
    with pytest.raises(DatasetError, match=r"1 hidden image files skipped"):
        build_dataset("folder", str(only_hidden))
    # the folder itself may live under a hidden directory
    inner = tmp_path / ".cache" / "imgs"
    inner.mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(inner / "z.png")
    assert [r.image_id for r in build_dataset("folder", str(inner)).records] == ["z.png"]


def test_folder_nested_sorted(tmp_path):
    for rel in ["b/z.png", "a.JPG", "b/a/x.webp", "c.tiff"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3)).save(tmp_path / rel, format={".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP",
                                                            ".tiff": "TIFF"}[Path(rel).suffix.lower()])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("folder", str(tmp_path))
    assert [r.image_id for r in ds.records] == ["a.JPG", "b/a/x.webp", "b/z.png", "c.tiff"]
    assert [r.coco_id for r in ds.records] == [1, 2, 3, 4]
    assert not ds.has_gt and all(not r.has_gt and len(r.boxes) == 0 for r in ds.records)
    assert build_dataset("folder", str(tmp_path), max_images=2).records[-1].image_id == "b/a/x.webp"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image"):
        build_dataset("folder", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="image folder not found"):
        build_dataset("folder", str(tmp_path / "missing"))


def test_demo_set():
    ds = build_dataset("demo", "")
    assert len(ds) == 6 == len(DEMO_IMAGES) and ds.name == "demo"
    assert [r.image_id for r in ds.records] == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera"]
    expected = {"astronaut": "person", "chelsea": "cat", "coffee": "cup", "rocket": "rocket",
                "motorcycle_left": "motorcycle", "camera": "person"}
    for r in ds.records:
        img = load_image(r.path)
        assert (r.height, r.width) == img.shape[:2]
        assert r.classes == [expected[r.image_id]] and r.boxes.shape == (1, 4)
        x1, y1, x2, y2 = r.boxes[0]
        assert 0 <= x1 < x2 <= r.width and 0 <= y1 < y2 <= r.height
        # a salient object, not the whole frame and not a sliver
        assert 0.015 < (x2 - x1) * (y2 - y1) / (r.width * r.height) < 0.95


def test_unknown_kind_and_bad_max_images():
    with pytest.raises(DatasetError, match="unknown dataset kind 'voc'.*voc07"):
        build_dataset("voc", "")
    with pytest.raises(DatasetError, match="max_images"):
        build_dataset("demo", "", max_images=0)


def test_dataset_configs_compose():
    """Each dataset file with its schema (pipeline.data.settings.DatasetSettings: the defaults live there)."""
    from omegaconf import OmegaConf
    from stage_utils import compose_cfg

    for kind in ("voc07", "voc12", "coco20k", "coco", "folder", "demo"):
        cfg = compose_cfg("mine", [f"dataset={kind}", "paths.data_root=/d"])
        d = OmegaConf.to_container(cfg.dataset, resolve=True)
        assert d["name"] == kind == d["kind"] and d["max_images"] is None
        assert {"root", "image_set", "ann_file", "image_dir", "list_file"} <= set(d)
        assert d["root"] == {"voc07": "/d", "voc12": "/d", "coco20k": "/d/coco", "coco": "/d/coco",
                             "folder": "/d/images", "demo": ""}[kind]
