"""Small synthetic experiments for the report tests: a 6-image COCO-format dataset with GT and the
artifacts every stage writes (pseudo-boxes, metrics, manifests, logs, pictures), in seconds, no model."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.artifacts import write_json, write_manifest, write_text

STAGES_ALL = ("mine", "cag", "cluster", "cad", "eval")

# per image: (GT boxes xywh with class, the mined box xywh): images 0, 2, 3 are hits, 1, 4, 5 misses
_IMAGES = [
    ([((4, 4, 30, 30), "cat")], (4, 4, 30, 30)),
    ([((30, 10, 30, 30), "dog")], (0, 0, 10, 10)),
    ([((10, 10, 40, 30), "dog")], (12, 10, 38, 30)),
    ([((0, 0, 64, 48), "cat"), ((5, 5, 10, 10), "dog")], (0, 0, 60, 48)),
    ([((40, 30, 20, 15), "cat")], (0, 0, 20, 15)),
    ([((2, 2, 20, 20), "dog")], (30, 20, 30, 25)),
]
CLUSTER = [1, 2, 2, 1, 1, 2]      # category id (cluster_0 / cluster_1) of each image's pseudo-box


def make_dataset(root: Path) -> dict:
    """Images + instances.json under ``root``; returns the dataset config (as the stages record it)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    cats = {"cat": 1, "dog": 2}
    for i, (gts, _) in enumerate(_IMAGES, start=1):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48})
        for box, c in gts:
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": list(box), "category_id": cats[c],
                         "area": box[2] * box[3], "iscrowd": 0})
    ann_file = root / "instances.json"
    write_json(ann_file, {"images": images, "annotations": anns,
                          "categories": [{"id": v, "name": k} for k, v in cats.items()]})
    return {"kind": "coco", "root": str(root), "image_set": "trainval", "ann_file": str(ann_file),
            "image_dir": str(img_dir), "list_file": None, "name": "voc07", "max_images": None}


def _png(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), color).save(path)


def _manifest(d: Path, stage: str, dataset: dict, random_init: bool, inputs=None, **extra) -> None:
    """A manifest as a stage writes it: the resolved config records where the tree was (``paths.output_root``,
    ``base_dir``, ``stage_dir``) and the keys that pick the stage's run (cluster K, the cluster run of cad)."""
    init = "random" if random_init else "pretrained"
    base = next(p for p in (d, *d.parents) if p.name == "dino_vits16")
    cfg = {"dataset": dataset, "backbone": {"arch": "dino_vits16", "name": "dino_vits16", "init": init,
                                            "feature": "k"},
           "paths": {"output_root": str(base.parents[1])}, "base_dir": str(base), "stage_dir": str(d)}
    if stage in ("train_cag", "train_cad"):
        cfg["detector"] = {"preset": "mobilenet_fpn", "init": init}
        cfg["schedule"] = {"name": "smoke", "iterations": 4, "batch_size": 2, "lr": 0.005}
    if stage == "cluster":
        cfg["cluster"] = {"source": d.parent.name, "k": 2, "run_name": d.name}
    if stage == "train_cad":
        cfg["train_cad"] = {"cluster_run": "lost/k2"}
    t = time.time()
    write_manifest(d, stage=stage, config=cfg, inputs=inputs or {}, start_time=t - 1, end_time=t,
                   weights_sha256=None if random_init else "ab" * 32,
                   extra={"random_init": random_init, **extra} if random_init else extra)


def _train(d: Path, stage: str, dataset: dict, random_init: bool, inputs: dict, num_classes: int) -> None:
    rows = [{"iteration": i, "loss": 2.0 / i, "loss_classifier": 1.0 / i, "loss_box_reg": 0.5 / i,
             "lr": 0.005 * min(1.0, i / 2)} for i in range(1, 5)]
    write_text(d / "metrics.jsonl", "".join(__import__("json").dumps(r) + "\n" for r in rows))
    write_json(d / "metrics.json", {"stage": stage, "iterations": 4, "final_loss": 0.5, "num_classes": num_classes,
                                    "detector": "mobilenet_fpn", "random_init": random_init,
                                    "detector_random_init": random_init, "boxes_random_init": random_init,
                                    "eval": {"images": 6, "corloc": 33.3, "AP50": 12.5, "AP": 4.2, "AP75": 1.0}})
    for i in (1, 2):
        _png(d / "viz" / f"im{i}.png", (0, 0, 200))
    _manifest(d, stage, dataset, random_init, inputs=inputs)


def make_experiment(out: Path, data_root: Path, stages=STAGES_ALL, random_init: bool = True,
                    miner: str = "lost") -> Path:
    """Write the artifacts of ``stages`` under ``out/voc07/dino_vits16``; returns that dir. ``miner``: whose
    chain (its folders as the config names them: ``mine_tokencut/``, ``cag_tokencut/``...)."""
    from stages.config import chain_dir

    dataset = make_dataset(data_root)
    base = out / "voc07" / "dino_vits16"
    mine, cag, cluster, cad = (base / chain_dir(k, miner) for k in ("mine", "cag", "cluster", "cad"))
    info = {"dataset": "voc07", "method": miner, "random_init": random_init, "image_root": dataset["image_dir"],
            "backbone": {"arch": "dino_vits16", "init": "random" if random_init else "pretrained"},
            "config": {"dataset": dataset}}
    images = [{"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48, "dataset_id": str(i)}
              for i in range(1, 7)]
    boxes = [{"id": i, "image_id": i, "bbox": list(pb), "area": pb[2] * pb[3], "iscrowd": 0, "category_id": 1,
              "score": 0.1 * i, "seed": 0} for i, (_, pb) in enumerate(_IMAGES, start=1)]
    if "mine" in stages:
        m = mine
        write_json(m / "pseudo_boxes.json", {"info": info, "images": images, "annotations": boxes,
                                             "categories": [{"id": 1, "name": "object"}]})
        write_json(m / "metrics.json", {"images": 6, "boxes": 6, "failures": 1, "method": miner,
                                        "backbone": "dino_vits16", "random_init": random_init, "corloc": 50.0,
                                        "corloc_hits": 3, "corloc_total": 6,
                                        "failed_images": [{"image_id": "7", "path": "/data/broken.jpg",
                                                           "error": "cannot identify image file"}]})
        for i in range(3):
            _png(m / "viz" / f"{i:06d}_{i + 1}.png", (200, 0, 0))
        _manifest(m, "mine", dataset, random_init)
    if "cag" in stages:
        _train(cag, "train_cag", dataset, random_init, {"pseudo_boxes": mine / "pseudo_boxes.json"}, 1)
    if "cluster" in stages:
        c = cluster / "lost" / "k2"
        labels = [dict(b, category_id=k) for b, k in zip(boxes, CLUSTER)]
        write_json(c / "pseudo_labels.json", {
            "info": {**info, "k": 2, "sizes": [3, 3], "clustering": {"k": 2, "random_init": random_init}},
            "images": images, "annotations": labels,
            "categories": [{"id": 1, "name": "cluster_0"}, {"id": 2, "name": "cluster_1"}]})
        write_json(c / "metrics.json", {"k": 2, "boxes": 6, "inertia": 1.25, "sizes": [3, 3], "empty_clusters": 0,
                                        "random_init": random_init, "source": "lost"})
        for k in range(2):
            _png(c / "galleries" / f"cluster_{k}.png", (0, 150, 0))
        _manifest(c, "cluster", dataset, random_init, inputs={"boxes": mine / "pseudo_boxes.json"})
    if "cad" in stages:
        _train(cad, "train_cad", dataset, random_init,
               {"pseudo_labels": cluster / "lost" / "k2" / "pseudo_labels.json"}, 2)
    if "eval" in stages:
        e = cad / "eval_trainval"
        write_json(e / "metrics.json", {
            "class_names": ["cat", "dog"], "cluster_ids": [1, 2, 3], "matching": {"cat": 1, "dog": 2},
            "per_class": {"cat": {"cluster": 1, "AP50": 40.0, "AP75": 10.0, "AP50:95": 15.0},
                          "dog": {"cluster": 2, "AP50": 20.0, "AP75": 5.0, "AP50:95": 7.5}},
            "mean": {"AP50": 30.0, "AP75": 7.5, "AP50:95": 11.25}, "unmatched_clusters": [3],
            "unmatched_classes": [], "classes_without_gt": [], "n_images": 6, "n_detections": 40,
            "gt": "voc07:trainval", "inference": {"random_init": random_init}})
        _manifest(e, "evaluate_cad", dataset, random_init, inputs={"model": cad / "metrics.json"})
    return base


def layout_for(base: Path, *args: str):
    """Where the stages of ``base`` (= out/<dataset>/<backbone>) are, as `make status` and `make report` see
    them: the config's ``dirs`` map for every chain (:func:`stages.locations.layout_of`); ``args``: more ARGS
    (``miner=tokencut``: that chain first)."""
    from stage_utils import compose_cfg
    from stages.locations import layout_of

    return layout_of(compose_cfg("status", [f"paths.output_root={base.parents[1]}", f"dataset={base.parent.name}",
                                            *args]))


def partial_training(d: Path, iteration: int, iterations: int) -> Path:
    """A training stage killed after its checkpoint at ``iteration`` of ``iterations``: a real ``model.pt``
    (the trainer's :class:`Checkpointer`, a tiny network) and the ``metrics.jsonl`` rows up to it; no
    metrics.json, no manifest (the stage writes those last)."""
    import json

    import torch

    from pipeline.detection.checkpoint import Checkpointer, DetectorSpec

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ckpt = Checkpointer(d / "model.pt", spec=DetectorSpec("mobilenet_fpn", 1),
                        schedule={"iterations": iterations, "batch_size": 2, "lr": 0.01})
    ckpt.save(net, opt, sched, torch.amp.GradScaler("cpu", enabled=False), iteration)
    write_text(d / "metrics.jsonl", "".join(json.dumps({"iteration": i, "loss": 1.0 / i, "lr": 0.01}) + "\n"
                                            for i in range(1, iteration + 1)))
    return d


FOLDER_GOOD, FOLDER_BAD = 8, ("bad0.jpg", "bad1.jpg", "bad2.jpg", "bad3.jpg", "tiny.png")


def mine_folder(out: Path, src: Path) -> Path:
    """A real mining run (``make mine ARGS="dataset=folder ..."``, random weights, in process, ~2 s) over a
    folder of 8 images, 4 files that are not images and a 1x1 image: the miner fails on those 5. Returns
    the base dir ``out/folder/dino_vits16``."""
    from stage_utils import compose_cfg
    from stages.mine import run

    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(FOLDER_GOOD):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / f"img{i:02d}.png")
    for name in FOLDER_BAD[:-1]:
        (src / name).write_bytes(b"not an image")
    Image.new("RGB", (1, 1)).save(src / FOLDER_BAD[-1])
    run(compose_cfg("mine", folder_args(out, src) + ["num_workers=0", "progress=false", "viz.num_images=2"]))
    return out / "folder" / "dino_vits16"


def folder_args(out: Path, src: Path) -> list[str]:
    """The ARGS of the folder experiment (every stage of it, status and report included)."""
    return [f"paths.output_root={out}", "dataset=folder", f"dataset.root={src}", "backbone.init=random"]
