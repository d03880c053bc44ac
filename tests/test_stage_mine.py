"""End to end: the mine stage on real images with random weights (artifacts, formats, ranges, errors)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stage_utils import compose_cfg, run_cli

FAST = ["backbone.init=random", "num_workers=0", "progress=false"]


def _mine(tmp_path, *overrides):
    from stages.mine import run

    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", *FAST, *overrides])
    return cfg, run(cfg)


def _check_coco(path, n_images):
    data = json.loads(path.read_text())
    assert len(data["images"]) == n_images
    assert [c["name"] for c in data["categories"]] == ["object"]
    by_id = {im["id"]: im for im in data["images"]}
    for a in data["annotations"]:
        im = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert x % 1 == 0 and y % 1 == 0  # boxes on the patch grid (x1, y1 multiples of the patch size)
    return data


def _folder(tmp_path, n=6):
    """Small random images (ViT-S/16 costs ~3 s per 512x512 image on 2 CPU cores: tests stay small)."""
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64 + 16 * (i % 3), 80 + 8 * i, 3), dtype=np.uint8)).save(
            src / f"im{i}.png")
    return src


def test_demo_writes_boxes_pictures_and_corloc(tmp_path):
    cfg, metrics = _mine(tmp_path, "dataset=demo", "dataset.max_images=2")
    stage = tmp_path / "demo" / "dino_vits16" / "mine"
    data = _check_coco(stage / "pseudo_boxes.json", 2)
    assert len(data["annotations"]) == 2
    assert all(a["bbox"][0] % 16 == 0 and a["bbox"][1] % 16 == 0 for a in data["annotations"])
    assert data["info"]["random_init"] is True and data["info"]["method"] == "lost"
    m = json.loads((stage / "metrics.json").read_text())
    assert m == metrics and m["random_init"] is True and m["images"] == 2 and m["failures"] == 0
    assert 0.0 <= m["corloc"] <= 100.0 and m["corloc_total"] == 2
    assert len(list((stage / "viz").glob("*.png"))) == 2
    assert Image.open(stage / "contact_sheet.png").size[0] > 0
    man = json.loads((stage / "manifest.json").read_text())
    assert man["stage"] == "mine" and man["config"]["backbone"]["init"] == "random"


def test_voc07_mini_and_dinoseg(tmp_path, voc07_mini):
    _, metrics = _mine(tmp_path, "dataset=voc07", f"paths.data_root={voc07_mini}", "dataset.max_images=2")
    assert metrics["images"] == 2 and metrics["corloc_total"] == 2
    _, m2 = _mine(tmp_path, "dataset=voc07", f"paths.data_root={voc07_mini}", "dataset.max_images=2",
                  "miner=dinoseg")
    assert m2["method"] == "dinoseg" and m2["images"] == 2
    assert (tmp_path / "voc07" / "dino_vits16" / "mine_dinoseg" / "pseudo_boxes.json").is_file()


def test_coco_tiny_writes_pseudo_masks_and_scores_them(tmp_path, coco_tiny):
    """Every pseudo-box has its mask as RLE of its image's size, ``area`` its pixel count, the box its extent;
    with GT masks the stage scores boxes and masks COCO-style (random weights: only the ranges are checked)."""
    from pipeline.masks import decode_rle

    _, metrics = _mine(tmp_path, "dataset=coco", f"dataset.root={coco_tiny}", "dataset.max_images=2",
                       "miner=maskcut")
    assert metrics["images"] == 2 and metrics["corloc"] is not None
    data = _check_coco(tmp_path / "coco" / "dino_vits16" / "mine_maskcut" / "pseudo_boxes.json", 2)
    size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    assert data["annotations"]
    for a in data["annotations"]:
        m = decode_rle(a["segmentation"])
        assert m.shape == size[a["image_id"]] and a["area"] == m.sum() > 0
        ys, xs = np.nonzero(m)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
    for key in ("mask", "box_ap"):
        assert set(metrics[key]) == {"AP", "AP50", "AP75", "AR100"}
        assert all(0.0 <= v <= 100.0 for v in metrics[key].values())


def test_folder_with_corrupt_image_is_skipped_and_reported(tmp_path):
    src = _folder(tmp_path, 3)
    good = (src / "im0.png").read_bytes()
    (src / "broken.png").write_bytes(good[: len(good) // 3])
    _, metrics = _mine(tmp_path, "dataset=folder", f"dataset.root={src}")
    assert metrics["images"] == 4 and metrics["boxes"] == 3 and metrics["failures"] == 1
    assert metrics["failed_images"][0]["path"].endswith("broken.png")
    assert metrics["corloc"] is None  # no labels, no CorLoc


def test_resume_skips_done_images_and_config_change_is_refused(tmp_path):
    src = _folder(tmp_path)
    folder = ["dataset=folder", f"dataset.root={src}", "viz.num_images=2"]
    cfg, first = _mine(tmp_path, *folder)
    assert first["computed_this_run"] == 6
    stage = tmp_path / "folder" / "dino_vits16" / "mine"
    reference = (stage / "pseudo_boxes.json").read_bytes()
    journal = stage / "results" / "shard-0000-of-0001.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2]) + lines[2][:10])  # a crash mid-write of the third line
    (stage / "pseudo_boxes.json").unlink()
    (stage / "viz").mkdir(exist_ok=True)
    stale = stage / "viz" / ".000002_im2.png.k3j2x.png"  # ... and of a picture (atomic_path's temp file)
    stale.write_bytes(b"\x89PNG half")
    _, again = _mine(tmp_path, *folder)
    assert again["resumed"] == 2 and again["computed_this_run"] == 4
    assert not stale.exists() and (stage / "contact_sheet.png").is_file()
    assert (stage / "pseudo_boxes.json").read_bytes() == reference
    from pipeline.rerun import RerunRefused
    with pytest.raises(RerunRefused, match=r"miner.k_patches: 100 -> 50.*Force the rerun"):
        _mine(tmp_path, *folder, "miner.k_patches=50")
    assert (stage / "pseudo_boxes.json").read_bytes() == reference
    _, forced = _mine(tmp_path, *folder, "miner.k_patches=50", "force=true")
    assert forced["computed_this_run"] == 6


def test_partial_results_of_another_config_are_refused(tmp_path):
    from pipeline.journal import JournalMismatch

    src = _folder(tmp_path, 3)
    folder = ["dataset=folder", f"dataset.root={src}", "viz.num_images=0"]
    _mine(tmp_path, *folder)
    stage = tmp_path / "folder" / "dino_vits16" / "mine"
    (stage / "pseudo_boxes.json").unlink()      # as if killed before the merge
    with pytest.raises(JournalMismatch, match="k_patches"):
        _mine(tmp_path, *folder, "miner.k_patches=50")


def test_report_only_rerun_redraws_pictures_and_keeps_boxes(tmp_path, capsys):
    src = _folder(tmp_path, 4)
    folder = ["dataset=folder", f"dataset.root={src}"]
    _mine(tmp_path, *folder, "viz.num_images=1")
    stage = tmp_path / "folder" / "dino_vits16" / "mine"
    boxes, journal = (stage / "pseudo_boxes.json").read_bytes(), (stage / "results").iterdir().__next__().read_bytes()
    assert len(list((stage / "viz").glob("*.png"))) == 1
    capsys.readouterr()
    _, again = _mine(tmp_path, *folder, "viz.num_images=3")
    out = capsys.readouterr().out
    assert "only report settings changed" in out and "viz.num_images: 1 -> 3" in out
    assert "this run mined" not in out  # a picture-only redraw mines nothing and says nothing of it
    assert len(list((stage / "viz").glob("*.png"))) == 3
    assert (stage / "pseudo_boxes.json").read_bytes() == boxes
    assert (stage / "results").iterdir().__next__().read_bytes() == journal  # nothing re-mined
    _, third = _mine(tmp_path, *folder, "viz.num_images=3")
    assert "is up to date" in capsys.readouterr().out and third == again


def test_grown_run_mines_only_new_images_and_retries_failures(tmp_path):
    src = _folder(tmp_path, 5)
    good = (src / "im0.png").read_bytes()
    (src / "im9.png").write_bytes(good[: len(good) // 3])           # corrupt: fails
    folder = ["dataset=folder", f"dataset.root={src}", "viz.num_images=0"]
    _, first = _mine(tmp_path, *folder, "dataset.max_images=4")
    assert first["computed_this_run"] == 4 and first["images"] == 4
    _, grown = _mine(tmp_path, *folder)                              # 6 images: 2 new (one corrupt)
    assert grown["computed_this_run"] == 2 and grown["images"] == 6 and grown["failures"] == 1
    (src / "im9.png").write_bytes(good)                              # the user fixes the file
    _, fixed = _mine(tmp_path, *folder)
    assert fixed["computed_this_run"] == 1 and fixed["failures"] == 0 and fixed["boxes"] == 6


def test_absolute_and_relative_data_paths_are_one_configuration(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    _mine(tmp_path, "dataset=folder", f"dataset.root={src}", "viz.num_images=0")
    capsys.readouterr()
    _mine(tmp_path, "dataset=folder", "dataset.root=imgs", "viz.num_images=0")
    assert "is up to date" in capsys.readouterr().out


def test_feature_q_writes_its_own_folder(tmp_path):
    src = _folder(tmp_path, 2)
    cfg, _ = _mine(tmp_path, "dataset=folder", f"dataset.root={src}", "viz.num_images=0", "backbone.feature=q")
    assert cfg.stage_dir.endswith("/mine_q") and (tmp_path / "folder/dino_vits16/mine_q/pseudo_boxes.json").is_file()


def test_misspelled_key_names_the_nearest(tmp_path):
    proc = run_cli("stages.mine", ["miner.k_patch=50", f"paths.output_root={tmp_path}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "'miner.k_patches'" in proc.stderr
    proc = run_cli("stages.mine", ["miner=dinoseg", "miner.k_patches=50", f"paths.output_root={tmp_path}"], check=False)
    assert proc.returncode == 2 and "miner.k_patches" in proc.stderr


def test_bad_device_is_one_clear_line(tmp_path):
    proc = run_cli("stages.mine", ["device=gpu", f"paths.output_root={tmp_path}", *FAST], check=False)
    assert proc.returncode != 0 and "error: device=gpu" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_root_is_one_clear_line(tmp_path):
    proc = run_cli("stages.mine", ["dataset=voc07", f"paths.data_root={tmp_path}/nowhere",
                                   f"paths.output_root={tmp_path}", *FAST], check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C while mining: one line (no KeyboardInterrupt traceback), exit 130, and what was mined is kept."""
    import pipeline.mining as mining
    from stages.common import run_guarded
    from stages.mine import run

    src = _folder(tmp_path, 3)
    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", *FAST, "dataset=folder", f"dataset.root={src}",
                               "viz.num_images=0"])
    real = mining.make_row
    calls = []

    def interrupt_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mining, "make_row", interrupt_second)
    with pytest.raises(SystemExit) as e:
        run_guarded(run, cfg)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted" in err and "resumes" in err and "Traceback" not in err
    monkeypatch.setattr(mining, "make_row", real)
    m = run(cfg)
    assert m["resumed"] == 1 and m["computed_this_run"] == 2


def test_plain_mine_after_a_demo_that_found_the_weights_is_up_to_date(tmp_path, capsys):
    """`make demo` (backbone.init=auto) that found the weights, then a plain `make mine` (pretrained) of the same
    model: the same configuration, not "changed: backbone.init: auto -> pretrained"."""
    import torch

    from pipeline.backbones import build_backbone

    weights = tmp_path / "vits16.pth"
    torch.save(build_backbone("dino_vits16", init="random", seed=3).model.state_dict(), weights)
    src = _folder(tmp_path, 2)
    common = ["dataset=folder", f"dataset.root={src}", f"backbone.weights={weights}", "viz.num_images=0"]
    cfg = compose_cfg("mine", [f"paths.output_root={tmp_path}", "num_workers=0", "progress=false", *common])
    from stages.mine import run

    m = run(compose_cfg("mine", [f"paths.output_root={tmp_path}", "num_workers=0", "progress=false",
                                 "backbone.init=auto", *common]))
    assert m["random_init"] is False
    capsys.readouterr()
    assert run(cfg) == m and "is up to date" in capsys.readouterr().out


def test_folder_messages_name_what_was_left_out(tmp_path):
    src = _folder(tmp_path, 2)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(src / "anim.gif")
    (src / "notes.txt").write_text("x")
    p = run_cli("stages.mine", [f"paths.output_root={tmp_path}", *FAST, "dataset=folder", f"dataset.root={src}",
                                "viz.num_images=0"])
    assert "skipped 2 file(s) that are not images of a supported kind (1 .gif, 1 .txt)" in p.stdout
    p = run_cli("stages.mine", [f"paths.output_root={tmp_path}", *FAST, "dataset=folder",
                                f"dataset.root={src / 'im0.png'}"], check=False)
    assert p.returncode == 2 and p.stderr.strip() == (f"error: {src / 'im0.png'} is a file, not a folder of images: "
                                                      f"give the folder that holds it ({src}).")


def test_the_shard_that_completes_a_set_without_merging_says_so(tmp_path, capsys):
    src = _folder(tmp_path, 2)
    common = ["dataset=folder", f"dataset.root={src}", "viz.num_images=0", "mine.num_shards=2", "mine.merge=false"]
    assert _mine(tmp_path, *common, "mine.shard=0")[1] is None
    assert "Waiting for the other shards" in capsys.readouterr().out
    assert _mine(tmp_path, *common, "mine.shard=1")[1] is None
    out = capsys.readouterr().out
    assert "every shard of" in out and "is complete; mine.merge=false, so `make merge` writes pseudo_boxes.json" in out
