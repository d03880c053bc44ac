"""Running a trained detector on images and exporting its detections.

Images are given as :class:`pipeline.data.records.ImageRecord` objects (``coco_id``, ``path``) or
COCO image dicts (``id``, ``file_name`` under ``image_root``). Detections are per-image dicts
``{"image_id": int, "boxes": (n, 4) float xyxy in original pixels, "scores": (n,), "labels": (n,)
int (1..K)}``, scores descending as torchvision returns them; a mask detector adds ``"masks"``: one compressed
RLE per box (its mask probability > 0.5 at the original size, as torchvision's Mask R-CNN pastes it). Scoring them (CorLoc, AP) is
:mod:`pipeline.evaluation.detections`; the top-1 box per image is :func:`pipeline.evaluation.corloc.top1_boxes`.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.boxes import xyxy_to_xywh
from pipeline.data.errors import ImageLoadError
from pipeline.data.images import try_decode
from pipeline.data.paths import resolve_image_path
from pipeline.masks import encode_rle


def image_list(images: Iterable, image_root: str | os.PathLike | None = None) -> list[tuple[int, str]]:
    """Normalise records / COCO image dicts to ``(coco_id, path)`` and check every file exists."""
    out = []
    for im in images:
        if isinstance(im, dict):
            out.append((int(im["id"]), str(resolve_image_path(str(im["file_name"]), image_root))))
        else:
            out.append((int(im.coco_id), str(resolve_image_path(str(im.path), image_root))))
    missing = [p for _, p in out if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} image(s) to run the detector on are missing: {shown}. "
                                "Check paths.data_root / the dataset's image root.")
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, images: Iterable, *, image_root: str | os.PathLike | None = None,
            device: str | torch.device = "cpu", batch_size: int = 2, progress: bool = False,
            failures: list | None = None) -> list[dict]:
    """Detections of ``model`` (put in eval mode) for each image, in input order. An image that cannot be
    decoded (corrupt, truncated, not an image) raises :class:`ImageLoadError`, or, when ``failures`` is a
    list, is skipped (no entry in the result) and listed there as ``{"image_id", "path", "error"}``."""
    items = image_list(images, image_root)
    device = torch.device(device)
    model.to(device).eval()
    out: list[dict] = []
    chunks = range(0, len(items), max(int(batch_size), 1))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="detect", dynamic_ncols=True)
    for s in chunks:
        batch, tensors = [], []
        for iid, path in items[s:s + batch_size]:
            img, err = try_decode(path)
            if err is not None:
                if failures is None:
                    raise ImageLoadError(err)
                failures.append({"image_id": iid, "path": path, "error": err})
                continue
            batch.append((iid, path))
            tensors.append(torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0).to(device))
        if not batch:
            continue
        preds = model(tensors)
        for (iid, _), p in zip(batch, preds):
            out.append({"image_id": iid, "boxes": p["boxes"].float().cpu().numpy().astype(np.float64),
                        "scores": exact_scores(p["scores"]),
                        "labels": p["labels"].cpu().numpy().astype(np.int64)})
            if "masks" in p:
                out[-1]["masks"] = [encode_rle(m) for m in (p["masks"][:, 0] > 0.5).cpu().numpy()]
    return out


def exact_scores(scores: torch.Tensor) -> np.ndarray:
    """A detector's (float32) scores as float64 holding the shortest decimal of each float32 (what
    ``str(np.float32(s))`` prints: ``0.9``, not ``0.8999999761581421``); lossless (each value rounds back
    to the same float32) and order-preserving."""
    s = scores.detach().float().cpu().numpy().astype(np.float32).reshape(-1)
    return np.array([float(str(v)) for v in s], dtype=np.float64)


def to_coco_results(detections: Sequence[dict], category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, ``segmentation`` when the
    detections have masks).

    ``category_ids[label - 1]`` is the category id written for label ``label`` (the dataset's
    ``category_ids``); None writes the label itself. Scores are written at full float precision (no
    rounding: two detections whose scores differ by 1e-8 stay distinct and keep their order); boxes
    are rounded to 1e-3 px.
    """
    res = []
    for d in detections:
        masks = d.get("masks")
        for i, (box, score, label) in enumerate(zip(xyxy_to_xywh(d["boxes"]), d["scores"], d["labels"])):
            cat = int(label) if category_ids is None else int(category_ids[int(label) - 1])
            res.append({"image_id": int(d["image_id"]), "category_id": cat,
                        "bbox": [round(float(v), 3) for v in box], "score": float(score)})
            if masks is not None:
                res[-1]["segmentation"] = masks[i]
    return res
