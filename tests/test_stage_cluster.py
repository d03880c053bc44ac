"""End to end: the cluster and evaluate-cad stages, tiny, with random weights (artifacts, cache, multirun)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.artifacts import coco_boxes_dataset, write_json
from stage_utils import compose_cfg, run_cli
from stages.common import StageError

FAST = ["backbone.init=random", "progress=false", "cluster.short_side=32", "cluster.n_init=2"]


@pytest.fixture
def mined(tmp_path):
    """A pseudo_boxes.json where the mine stage would write it, over 4 synthetic images (10 boxes)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(4):
        a = rng.integers(0, 255, (64 + 16 * i, 96, 3), dtype=np.uint8)
        Image.fromarray(a).save(imgs / f"im{i}.png")
        images.append({"id": 10 + i, "file_name": f"im{i}.png", "width": 96, "height": 64 + 16 * i})
        for j in range(3 if i < 2 else 2):
            anns.append({"image_id": 10 + i, "bbox_xyxy": [8 * j, 4 * j, 40 + 8 * j, 50], "score": 0.5 + j / 10,
                         "seed": j})
    coco = coco_boxes_dataset(images, anns, info={"method": "lost", "image_root": str(imgs)})
    write_json(tmp_path / "out" / "demo" / "dino_vits16" / "mine" / "pseudo_boxes.json", coco)
    return tmp_path / "out", coco


def _cluster(out, *overrides):
    from stages.cluster import run

    cfg = compose_cfg("cluster", [f"paths.output_root={out}", *FAST, *overrides])
    return run(cfg)


def test_cluster_writes_pseudo_labels_galleries_and_reuses_features(mined, capsys):
    out, coco = mined
    m2 = _cluster(out, "cluster.k=2")
    base = out / "demo" / "dino_vits16" / "cluster" / "lost"
    stage = base / "k2"
    labels = json.loads((stage / "pseudo_labels.json").read_text())
    assert [c["name"] for c in labels["categories"]] == ["cluster_0", "cluster_1"]
    assert [a["bbox"] for a in labels["annotations"]] == [a["bbox"] for a in coco["annotations"]]
    cats = [a["category_id"] for a in labels["annotations"]]
    assert set(cats) <= {1, 2} and labels["info"]["sizes"] == [cats.count(1), cats.count(2)]
    assert np.array(labels["info"]["centroids"]).shape == (2, 384)
    assert labels["info"]["method"] == "lost" and labels["info"]["clustering"]["random_init"] is True
    assert m2["boxes"] == 10 and m2["skipped"] == 0 and not m2["features_from_cache"] and m2["random_init"]
    assert json.loads((stage / "metrics.json").read_text()) == m2
    assert json.loads((stage / "manifest.json").read_text())["stage"] == "cluster"
    pngs = sorted(p.name for p in (stage / "galleries").glob("*.png"))
    assert pngs == [f"cluster_{k}.png" for k in range(2) if labels["info"]["sizes"][k]]
    assert (base / "features" / "features.npy").is_file()

    m3 = _cluster(out, "cluster.k=3")
    assert m3["features_from_cache"] and (base / "k3" / "pseudo_labels.json").is_file()
    assert (stage / "pseudo_labels.json").is_file()            # K=2 output kept
    assert _cluster(out, "cluster.k=2") == m2                # complete and unchanged: up to date, skipped
    assert "is up to date" in capsys.readouterr().out
    first = (stage / "pseudo_labels.json").read_bytes()
    (stage / "pseudo_labels.json").unlink()                    # incomplete: recomputed, deterministically
    again = _cluster(out, "cluster.k=2")
    assert again["sizes"] == m2["sizes"] and again["inertia"] == pytest.approx(m2["inertia"])
    assert again["features_from_cache"] and (stage / "pseudo_labels.json").read_bytes() == first
    # FORCE redoes the clustering beside the finished run and swaps it in; the feature cache, keyed by the
    # boxes, backbone and crop settings and checked by its sha256, is reused
    forced = _cluster(out, "cluster.k=2", "force=true")
    assert forced["features_from_cache"] and (stage / "pseudo_labels.json").read_bytes() == first
    assert not (stage.parent / ".k2.new").exists() and not (stage.parent / ".k2.old").exists()


def test_missing_input_and_too_large_k_are_clear(tmp_path, mined, capsys):
    from stages.cluster import run
    from stages.common import run_guarded

    cfg = compose_cfg("cluster", [f"paths.output_root={tmp_path / 'empty'}", *FAST])
    with pytest.raises(SystemExit) as e:
        run_guarded(run, cfg)
    assert e.value.code == 2
    assert "pseudo_boxes.json" in capsys.readouterr().err
    out, _ = mined
    with pytest.raises(StageError, match="lower cluster.k"):
        _cluster(out, "cluster.k=11")


def test_a_threshold_above_every_detection_says_so(tmp_path, capsys):
    """Detections exist but score below cluster.score_threshold: say how many and the best score, not "no boxes"."""
    from stages.cluster import run
    from stages.common import run_guarded

    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10 + i, 10], "score": s}
            for i, s in enumerate([0.2, 0.49, 0.3])]
    write_json(tmp_path / "dets.json", dets)
    cfg = compose_cfg("cluster", [f"paths.output_root={tmp_path}", *FAST, "cluster.source=cag",
                                  f"cluster.boxes={tmp_path / 'dets.json'}", "cluster.score_threshold=0.7"])
    with pytest.raises(SystemExit) as e:
        run_guarded(run, cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (f"error: {tmp_path / 'dets.json'}: it holds 3 detections, but none scores >= "
                                         "cluster.score_threshold=0.7 (the best scores 0.49): lower "
                                         "cluster.score_threshold")


@pytest.mark.slow
def test_multirun_over_k_from_the_command_line(mined):
    out, _ = mined
    run_cli("stages.cluster", ["-m", "cluster.k=2,3", f"paths.output_root={out}", *FAST])
    base = out / "demo" / "dino_vits16" / "cluster" / "lost"
    m = [json.loads((base / f"k{k}" / "metrics.json").read_text()) for k in (2, 3)]
    assert [x["k"] for x in m] == [2, 3] and [x["features_from_cache"] for x in m] == [False, True]


def test_cluster_cag_detections_with_threshold(tmp_path, voc07_mini):
    from pipeline.data import build_dataset

    ds = build_dataset("voc07", str(voc07_mini), max_images=3)
    results = [{"image_id": r.coco_id, "category_id": 1, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for r in ds.records for b, s in zip(r.boxes, np.linspace(0.2, 0.9, len(r.boxes)))]
    out = tmp_path / "out"
    write_json(out / "voc07" / "dino_vits16" / "cag" / "detections.json", results)
    m = _cluster(out, "dataset=voc07", f"paths.data_root={voc07_mini}", "dataset.max_images=3",
                 "cluster.source=cag", "cluster.score_threshold=0.5", "cluster.k=2")
    kept = sum(r["score"] >= 0.5 for r in results)
    assert 2 <= kept < len(results) and m["boxes"] == kept and m["skipped"] == 0
    labels = json.loads((out / "voc07" / "dino_vits16" / "cluster" / "cag" / "k2" / "pseudo_labels.json").read_text())
    assert len(labels["annotations"]) == kept and all(a["score"] >= 0.5 for a in labels["annotations"])


def _permuted_gt_results(records, class_names, perm):
    cidx = {c: i for i, c in enumerate(class_names)}
    return [{"image_id": r.coco_id, "category_id": int(perm[cidx[c]]) + 1, "score": 1.0 - 0.001 * n,
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for n, r in enumerate(records) for b, c in zip(r.boxes, r.classes)]


def test_evaluate_cad_on_voc_recovers_a_permutation(tmp_path, voc07_mini):
    from pipeline.data import build_dataset
    from stages.evaluate_cad import run

    ds = build_dataset("voc07", str(voc07_mini))
    perm = np.random.default_rng(0).permutation(len(ds.class_names))
    det = tmp_path / "dets.json"
    write_json(det, _permuted_gt_results(ds.records, ds.class_names, perm))
    cfg = compose_cfg("evaluate_cad", [f"paths.output_root={tmp_path}", "dataset=voc07",
                                       f"paths.data_root={voc07_mini}", f"evaluate_cad.detections={det}", "evaluate_cad.num_clusters=22"])
    res = run(cfg)
    stage = tmp_path / "eval_dets"  # beside the detections file, not under a dataset's outputs
    assert json.loads((stage / "metrics.json").read_text())["mean"] == res["mean"]
    assert res["mean"]["AP50"] == pytest.approx(100) and res["mean"]["AP50:95"] == pytest.approx(100)
    present = [c for c in ds.class_names if c not in res["classes_without_gt"]]
    assert res["matching"] == {c: int(perm[ds.class_names.index(c)]) + 1 for c in present}
    unused = {int(perm[ds.class_names.index(c)]) + 1 for c in res["classes_without_gt"]} | {21, 22}
    assert set(res["unmatched_clusters"]) == unused
    md = (stage / "hungarian.md").read_text()
    assert "| **mean** |  | **100.00** |" in md and len([ln for ln in md.splitlines() if ln.startswith("| ")]) == \
        len(present) + 2


@pytest.mark.slow
def test_evaluate_cad_standalone_cli_with_coco_gt(tmp_path, coco_tiny):
    from pipeline.data.coco import load_coco

    gt = coco_tiny / "annotations" / "instances_val2017.json"
    ds = load_coco(coco_tiny, ann_file=str(gt), image_dir=str(coco_tiny))
    perm = np.random.default_rng(1).permutation(len(ds.class_names))
    det = tmp_path / "dets.json"
    write_json(det, _permuted_gt_results(ds.records, ds.class_names, perm))
    run_cli("stages.evaluate_cad", [f"evaluate_cad.detections={det}", f"evaluate_cad.gt={gt}", f"stage_dir={tmp_path / 'ev'}",
                                    f"paths.output_root={tmp_path}"])
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    raw = json.loads(gt.read_text())
    with_gt = {a["category_id"] for a in raw["annotations"] if not a["iscrowd"]}
    assert len(with_gt) == (36 if len(raw["images"]) == 16 else 80)  # in-repo subset / shared one-per-category
    assert res["mean"]["AP50"] == pytest.approx(100)
    assert set(res["matching"]) == {c["name"] for c in raw["categories"] if c["id"] in with_gt}
    proc = run_cli("stages.evaluate_cad", [f"evaluate_cad.detections={tmp_path / 'nope.json'}", f"evaluate_cad.gt={gt}",
                                           f"paths.output_root={tmp_path}"], check=False)
    assert proc.returncode == 2 and "nope.json" in proc.stderr and "Traceback" not in proc.stderr


def test_cluster_report_only_rerun_and_refused_change(mined, capsys):
    out, _ = mined
    _cluster(out, "cluster.k=2", "viz.gallery_size=2")
    stage = out / "demo" / "dino_vits16" / "cluster" / "lost" / "k2"
    labels = (stage / "pseudo_labels.json").read_bytes()
    size_before = Image.open(next((stage / "galleries").glob("*.png"))).size
    capsys.readouterr()
    _cluster(out, "cluster.k=2", "viz.gallery_size=2", "viz.thumb=48")
    assert "redrawing the galleries" in capsys.readouterr().out
    assert (stage / "pseudo_labels.json").read_bytes() == labels
    assert Image.open(next((stage / "galleries").glob("*.png"))).size != size_before
    from pipeline.rerun import RerunRefused
    with pytest.raises(RerunRefused, match=r"cluster.seed: 0 -> 1.*Force the rerun"):
        _cluster(out, "cluster.k=2", "cluster.seed=1")
    assert (stage / "pseudo_labels.json").read_bytes() == labels
    _cluster(out, "cluster.k=2", "cluster.seed=1", "force=true")
