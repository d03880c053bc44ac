"""The report's mining section: one column per mining run (every chain's mine folder), its pictures and its
worst images.

Worst images: the images the miner did worst on, never the ones it failed on (listed as failures) or images
too small to be pictures (under :data:`MIN_SIDE` px): those would be black or empty pictures, not misses.
A run's numbers, failures and pictures are read through :class:`pipeline.summaries.MiningSummary`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.artifacts import atomic_path
from pipeline.report import plots
from pipeline.report.published import FULL_SET_IMAGES, published_corloc
from pipeline.summaries import MiningSummary, read_json_or_none

if TYPE_CHECKING:
    from pipeline.report.build import Builder

MIN_SIDE = 2      # px: an image smaller than this on a side is degenerate (never a "worst image")


def mining_dirs(b: "Builder") -> list[Path]:
    """Every chain's mine folder that holds a run's results."""
    return [d for kind, d, _ in b.layout.folders() if kind == "mine"
            and ((d / "metrics.json").is_file() or (d / "pseudo_boxes.json").is_file())]


def mining(b: "Builder", d: Path) -> dict:
    stage = b.layout.name(d)
    summary = MiningSummary.read(d)
    metrics = summary.raw
    coco = read_json_or_none(d / "pseudo_boxes.json")
    info = (coco or {}).get("info") or {}
    random_init = b.mark_random(f"{stage}/metrics.json", metrics) | b.mark_random(
        f"{stage}/pseudo_boxes.json", {"info": {k: v for k, v in info.items() if k != "config"}})
    dataset_name = str(info.get("dataset") or b.root.parent.name)
    backbone = str(summary.backbone or (info.get("backbone") or {}).get("arch") or b.root.name)
    method = str(summary.method or info.get("method") or (stage.split("_", 1)[1] if "_" in stage else "lost"))
    n_images = summary.images or (len(coco["images"]) if coco else None)
    full = FULL_SET_IMAGES.get(dataset_name)
    out = {"stage": stage, "status": b.status.get(stage), "method": method, "backbone": backbone,
           "dataset": dataset_name, "images": n_images, "multi_box": summary.multi_box,
           "boxes": summary.boxes, "corloc": summary.corloc,
           "corloc_hits": summary.corloc_hits, "corloc_total": summary.corloc_total,
           "published_corloc": published_corloc(method, backbone, dataset_name, info.get("miner_params")),
           "random_init": random_init,
           "is_result": not random_init, "full_set": bool(full and n_images == full), "full_set_images": full,
           "failed_images": summary.failed_images, "failures": metrics.get("failures", 0),
           "seconds": summary.seconds, "pictures": [], "worst": [], "score_hist": None,
           "box_ap": metrics.get("box_ap"), "mask_ap": metrics.get("mask")}
    if coco:
        scores = [a.get("score") for a in coco["annotations"] if a.get("score") is not None]
        slug = _slug(stage)
        out["score_hist"] = b.rel(plots.histogram(
            scores, b.img / f"{slug}_scores.png", title=f"{stage}: box scores ({len(scores)} boxes)",
            xlabel="score", random_init=random_init))
        _mining_pictures(b, summary, stage, coco, info, out, _unpicturable(coco, summary))
    return out


def _slug(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage)


def _mining_pictures(b: "Builder", summary: MiningSummary, stage: str, coco: dict, info: dict, out: dict,
                     skip: set[str]) -> None:
    """The first pictures (the stage's viz/) and the worst images, drawn here; ``skip``: dataset ids that
    are never worst images (failed or degenerate, :func:`_unpicturable`)."""
    from pipeline.boxes import xywh_to_xyxy
    from pipeline.evaluation.corloc import corloc

    slug = _slug(stage)
    images = coco["images"]
    box_of: dict[int, list[float]] = {}
    score_of: dict[int, float] = {}
    for a in coco["annotations"]:
        box_of[int(a["image_id"])] = xywh_to_xyxy([a["bbox"]])[0].tolist()
        score_of[int(a["image_id"])] = float(a.get("score") or 0.0)
    ds = b.records((info.get("config") or {}).get("dataset"))
    per_image, ious, rec_of = {}, {}, {}
    if ds is not None:
        ids = {int(im["id"]) for im in images}
        recs = [r for r in ds.records if int(r.coco_id) in ids]
        rec_of = {int(r.coco_id): r for r in recs}
        preds = {r.image_id: (np.asarray(box_of[int(r.coco_id)]) if int(r.coco_id) in box_of else None)
                 for r in recs}
        if recs:
            res = corloc(preds, recs)
            per_image, ious = res.per_image, res.ious
            out["corloc_recomputed"] = res.corloc
    by_ds_id = {str(im.get("dataset_id", im["id"])): im for im in images}
    shown = set()
    for pic in summary.pictures()[: b.max_pictures]:
        im = images[pic.index] if pic.index is not None and pic.index < len(images) else None
        key = str(im.get("dataset_id", im["id"])) if im else None
        hit = per_image.get(key) if key is not None else None
        out["pictures"].append({"src": b.copy(pic.path, f"{slug}_viz_{pic.path.name}"), "image_id": key, "hit": hit,
                                "iou": ious.get(key), "score": score_of.get(int(im["id"])) if im else None})
        shown.add(key)
    # the worst images: lowest best-IoU with GT when there is GT, else lowest box score
    if per_image:
        cand = sorted((k for k in per_image if k not in shown and k not in skip), key=lambda k: (ious.get(k, 0.0), k))
    else:
        cand = sorted((k for k in by_ds_id if k not in shown and k not in skip),
                      key=lambda k: (score_of.get(int(by_ds_id[k]["id"]), -1.0), k))
    root = Path(str(info.get("image_root") or ""))
    for k in cand:
        if len(out["worst"]) >= b.n_worst:
            break
        im = by_ds_id[k]
        rec = rec_of.get(int(im["id"]))
        path = Path(rec.path) if rec is not None else root / str(im.get("file_name", ""))
        pic = draw(path, box_of.get(int(im["id"])), rec.boxes if rec is not None and rec.has_gt else None,
                   f"{k}  IoU {ious.get(k, 0.0):.2f}" if k in ious else f"{k}  score {score_of.get(int(im['id']), 0):.2f}")
        if pic is None:
            continue
        dst = b.img / f"{slug}_worst_{re.sub(r'[^A-Za-z0-9_.-]', '_', k)}.png"
        with atomic_path(dst, suffix=".png") as tmp:
            pic.save(tmp, format="PNG")
        out["worst"].append({"src": b.rel(dst), "image_id": k, "hit": per_image.get(k), "iou": ious.get(k),
                             "score": score_of.get(int(im["id"]))})


def draw(path: Path, box, gt_boxes, title: str):
    """The image with the predicted box (red) and GT boxes (green), shrunk to 512 px, then its title and a
    legend line (drawn after shrinking, so they stay legible); None if unreadable. Any box and image size
    (see :mod:`pipeline.viz.boxes`)."""
    from PIL import Image

    from pipeline.viz.boxes import as_boxes
    from pipeline.viz.mining import draw_box_and_gt, line_width
    from pipeline.viz.style import GT, PRED, Key, finish_picture

    try:
        with Image.open(path) as im:
            pil = im.convert("RGB")
    except (OSError, ValueError):
        return None
    skipped = draw_box_and_gt(pil, box, gt_boxes, line_width(pil.height, pil.width))
    pil.thumbnail((512, 512))
    keys = [Key(PRED, "box", 2)] + ([Key(GT, "GT", 2)] if len(as_boxes(gt_boxes)) else [])
    return finish_picture(pil, title, keys, skipped)


def _unpicturable(coco: dict, summary: MiningSummary) -> set[str]:
    """Dataset ids of the images never shown as worst images: those the miner failed on (metrics.json's
    ``failed_images``) and those without a size or under :data:`MIN_SIDE` px on a side (a 1x1 image)."""
    out = summary.failed_ids()
    for im in coco.get("images") or []:
        w, h = im.get("width"), im.get("height")
        if w is None or h is None or min(w, h) < MIN_SIDE:
            out.add(str(im.get("dataset_id", im["id"])))
    return out
