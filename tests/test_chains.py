"""The whole chain with the DEFAULT picture settings, once per miner and per detector family, on the VOC fixture,
the COCO fixture and a folder of odd images made here (issue 20: the chain tests ran with pictures off and
missed a crash while drawing a sub-pixel detection). Random weights, smoke schedule: a smoke test of the code
(every stage ends well and draws every picture), never a result."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stage_utils import compose_cfg

# the ResNet-50 presets cost ~10x mobilenet on a CPU: their chains run on 2 images and 2 iterations
R50 = ["dataset.max_images=2", "schedule.iterations=2", "schedule.steps=[1]"]
SMOKE = ["backbone.init=random", "detector.init=random", "schedule=smoke", "num_workers=0", "progress=false",
         "cluster.k=2", "cluster.short_side=32", "cluster.n_init=2", "mine.procs=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def odd_folder(root):
    """Images a user's folder holds: ordinary, grey, RGBA, 16-bit, a 1x1 PNG, strips thinner than a patch or
    long and thin, a truncated JPEG, a GIF (not a supported kind) and a hidden file."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64 + 16 * i, 96, 3), dtype=np.uint8)).save(root / f"photo{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 96, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (64, 48), dtype=np.uint16)).save(root / "deep16.png")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(root / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (8, 300, 3), dtype=np.uint8)).save(root / "strip.png")
    Image.fromarray(rng.integers(0, 255, (17, 400, 3), dtype=np.uint8)).save(root / "thin.png")
    good = (root / "photo0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "anim.gif")
    (root / "._photo0.jpg").write_bytes(b"\x00\x05\x16\x07")
    return root


def _pngs(d):
    return sorted(p.name for p in d.glob("*.png")) if d.is_dir() else []


def run_chain(data: list[str], *, labelled: bool) -> dict:
    """mine -> train-cag -> cluster -> train-cad [-> evaluate-cad] -> report, in process, default pictures."""
    from stages.cluster import run as cluster
    from stages.evaluate_cad import run as evaluate_cad
    from stages.mine import run as mine
    from stages.report import run as report
    from stages.train_cad import run as train_cad
    from stages.train_cag import run as train_cag

    args = [*data, *SMOKE]
    out = {"mine": mine(compose_cfg("mine", args)), "cag": train_cag(compose_cfg("train_cag", args)),
           "cluster": cluster(compose_cfg("cluster", args)), "cad": train_cad(compose_cfg("train_cad", args))}
    if labelled:
        out["evaluate_cad"] = evaluate_cad(compose_cfg("evaluate_cad", args))
    report(compose_cfg("report", args))
    return out


def _check_pictures(base, mine_dir: str, n_mine: int):
    chain = mine_dir[len("mine"):]     # a chain's downstream folders are keyed like its mine folder (cag_tokencut)
    assert len(_pngs(base / mine_dir / "viz")) == n_mine and (base / mine_dir / "contact_sheet.png").is_file()
    assert _pngs(base / f"cag{chain}" / "viz") and _pngs(base / f"cad{chain}" / "viz")
    assert _pngs(base / f"cluster{chain}" / "lost" / "k2" / "galleries")
    page = (base / "report" / "index.html").read_text()
    assert "Traceback" not in page and "RANDOM" in page
    for p in (base / "report").rglob("*.png"):
        with Image.open(p) as im:
            assert im.size[0] > 0 and im.size[1] > 0


@pytest.mark.parametrize("miner, detector, n", [("lost", "mobilenet_fpn", 4), ("maskcut", "r50_c4", 2)])
def test_voc_chain(tmp_path, voc07_mini, miner, detector, n):
    data = [f"paths.output_root={tmp_path}", "dataset=voc07", f"paths.data_root={voc07_mini}",
            "dataset.max_images=4", f"miner={miner}", f"detector={detector}", *(R50 if n == 2 else [])]
    res = run_chain(data, labelled=True)
    base = tmp_path / "voc07" / "dino_vits16"
    _check_pictures(base, "mine" if miner == "lost" else f"mine_{miner}", n)
    assert res["mine"]["corloc_total"] == n and res["cag"]["eval"]["images"] == n
    assert res["evaluate_cad"]["mean"]["AP50"] is not None


@pytest.mark.parametrize("miner, detector, n", [("dinoseg", "r50_fpn", 2), ("tokencut", "mask_mobilenet_fpn", 4)])
def test_coco_chain(tmp_path, coco_tiny, miner, detector, n):
    data = [f"paths.output_root={tmp_path}", "dataset=coco", f"dataset.root={coco_tiny}", "dataset.max_images=4",
            f"miner={miner}", f"detector={detector}", *(R50 if n == 2 else [])]
    res = run_chain(data, labelled=True)
    base = tmp_path / "coco" / "dino_vits16"
    _check_pictures(base, f"mine_{miner}", n)
    assert res["mine"]["images"] == n and res["cag"]["eval"]["images"] == n
    assert set(res["mine"]["mask"]) == {"AP", "AP50", "AP75", "AR100"}   # the pseudo-masks scored (GT masks)
    if detector.startswith("mask_"):  # the mask head trained on the pseudo-masks, scored on both detectors
        assert set(res["cag"]["eval"]["mask"]) == set(res["cad"]["eval"]["mask"]) == {"AP", "AP50", "AP75", "AR100"}
        assert "mask" in (base / "report" / "index.html").read_text()
        assert {"mask_AP50", "mask_AP"} <= set(res["evaluate_cad"]["mean"])   # per class, of the matched cluster


@pytest.mark.parametrize("miner, detector", [("maskcut", "mask_mobilenet_fpn"), ("tokencut", "mobilenet_fpn")])
def test_odd_folder_chain(tmp_path, capsys, miner, detector):
    """Every odd image is mined or listed as failed; no detector runs on the failed ones; every picture is drawn."""
    src = odd_folder(tmp_path / "odd")
    data = [f"paths.output_root={tmp_path}", "dataset=folder", f"dataset.root={src}", f"miner={miner}",
            f"detector={detector}"]
    res = run_chain(data, labelled=False)
    out = capsys.readouterr().out
    assert "skipped 1 hidden file" in out and "skipped 1 file(s) that are not images of a supported kind (1 .gif)" in out
    m = res["mine"]
    failed = sorted(f["path"].rsplit("/", 1)[-1] for f in m["failed_images"])
    assert m["images"] == 10 and failed == ["strip.png", "tiny.png", "truncated.jpg"], failed
    assert res["cag"]["eval"]["images"] == 7 and res["cag"]["eval"]["images_failed_in_mining"] == 3
    base = tmp_path / "folder" / "dino_vits16"
    _check_pictures(base, f"mine_{miner}", 7)
    coco = json.loads((base / f"mine_{miner}" / "pseudo_boxes.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"] if im.get("mining_error")) == failed


def test_cutler_recipe_trains_and_is_recorded(tmp_path, coco_tiny, capsys):
    """DropLoss and copy-paste on MaskCut's pseudo-masks with a mask detector: trains, is recorded in model.pt (a
    model trained without them records nothing new), a second run is up to date; copy-paste with a box detector
    is one error line."""
    import torch

    from stages.common import run_guarded
    from stages.mine import run as mine
    from stages.train_cag import run as train_cag

    data = [f"paths.output_root={tmp_path}", "dataset=coco", f"dataset.root={coco_tiny}", "dataset.max_images=3",
            "miner=maskcut", *SMOKE]
    mine(compose_cfg("mine", data))
    recipe = [*data, "detector=mask_mobilenet_fpn", "train_cag.drop_loss_iou=0.01", "train_cag.copy_paste=0.5"]
    m = train_cag(compose_cfg("train_cag", recipe))
    assert m["iterations"] == 4 and set(m["eval"]["mask"]) == {"AP", "AP50", "AP75", "AR100"}
    model = tmp_path / "coco" / "dino_vits16" / "cag_maskcut" / "model.pt"
    artifact = torch.load(model, map_location="cpu", weights_only=False)["artifact_config"]
    assert artifact["recipe"] == {"drop_loss_iou": 0.01, "copy_paste": 0.5}
    capsys.readouterr()
    train_cag(compose_cfg("train_cag", recipe))
    assert "is up to date" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_guarded(train_cag, compose_cfg("train_cag", [*data, "detector=mobilenet_fpn", "train_cag.copy_paste=0.5",
                                                         f"stage_dir={tmp_path / 'box'}"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train_cag.copy_paste=0.5 pastes objects with their masks" in err


@pytest.mark.parametrize("miner, detector", [
    (["miner=votecut", "miner.backbones=[dino_vits16,dinov2_vits14:normed]", "miner.image_size=128",
      "miner.min_size=1"], "cascade_mask_mobilenet_fpn"),
    (["miner=found", "miner.mode=multi"], "cascade_mask_mobilenet_fpn")])
def test_scored_miners_chain(tmp_path, coco_tiny, monkeypatch, miner, detector):
    """VoteCut's ensemble and FOUND, their scores as soft targets (score_weighting) of a Cascade Mask R-CNN, through
    the whole chain with the default pictures: the cascade's stage losses get the pseudo-boxes' scores."""
    import torch

    import pipeline.detection.score_weighting as sw

    weights, loss = [], sw.weighted_fastrcnn_loss
    monkeypatch.setattr(sw, "weighted_fastrcnn_loss", lambda *a: weights.append(torch.cat(a[-1])) or loss(*a))
    data = [f"paths.output_root={tmp_path}", "dataset=coco", f"dataset.root={coco_tiny}", "dataset.max_images=3",
            *miner, f"detector={detector}", "train_cag.score_weighting=true"]
    res = run_chain(data, labelled=True)
    name = miner[0].split("=")[1]
    base = tmp_path / "coco" / "dino_vits16"
    _check_pictures(base, f"mine_{name}", 3)
    boxes = json.loads((base / f"mine_{name}" / "pseudo_boxes.json").read_text())
    assert all(0 <= a["score"] <= 1 for a in boxes["annotations"]) and res["mine"]["images"] == 3
    assert set(res["cag"]["eval"]["mask"]) == {"AP", "AP50", "AP75", "AR100"}
    artifact = torch.load(base / f"cag_{name}" / "model.pt", map_location="cpu", weights_only=False)["artifact_config"]
    assert artifact["recipe"]["score_weighting"] is True
    seen = torch.cat(weights)  # every RoI's weight in every stage of every step: some mined scores below 1
    assert len(weights) >= 3 and bool((seen < 1).any()) and bool(((seen > 0) & (seen <= 1)).all())
    assert res["evaluate_cad"]["mean"]["AP50"] is not None
