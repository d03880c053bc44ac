"""What the detector stages share (train-cag, train-cad, evaluate-cag, evaluate-cad's inference).

Running a trained detector on records and reporting it: :func:`detect_score_draw` composes the library's
three steps: detection (:func:`pipeline.detection.inference.predict`, written as detections.json),
scoring (:func:`pipeline.evaluation.detections.score_detections`) and pictures (``viz/``).
Loading the detector is :func:`pipeline.detection.checkpoint.load_detector`; "random weights" is
:func:`pipeline.provenance.random_init`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

from pipeline.artifacts import write_json
from stages.common import warn_random


def warn_if_random(spec, model_path: Path, random_init: bool, what: str = "pseudo-boxes") -> None:
    if random_init:
        warn_random(f"detector {spec.preset}", f"{model_path} was trained from random weights (detector or {what})")


def detect_score_draw(model, records: Sequence, out_dir: Path, *, category_ids: Sequence[int], mode: str,
                      voc_difficult: str = "remove", device: str = "cpu", batch_size: int = 2,
                      progress: bool = False, viz_images: int = 0, viz_min_score: float = 0.3,
                      random_init: bool = False) -> dict:
    """Detect on ``records``; write ``out_dir``/detections.json (COCO results, ``image_id`` = coco_id,
    ``category_id = category_ids[label - 1]``) and ``out_dir``/viz/ (the first ``viz_images`` images);
    return the scores (LOST+CAD top-1 CorLoc, class-agnostic AP50/AP over the records with GT) with
    ``inference_seconds``."""
    from pipeline.detection.inference import predict, to_coco_results
    from pipeline.viz.detections import write_detection_pictures
    from pipeline.evaluation.detections import score_detections

    t0 = time.time()
    unreadable: list[dict] = []
    dets = predict(model, records, device=device, batch_size=batch_size, progress=progress, failures=unreadable)
    write_json(out_dir / "detections.json", to_coco_results(dets, list(category_ids)), indent=None)  # one line
    seconds = round(time.time() - t0, 3)
    m = score_detections(dets, records, mode=mode, voc_difficult=voc_difficult)
    m["inference_seconds"] = seconds
    m["unreadable_images"] = unreadable  # skipped (a miss for CorLoc), listed: never a traceback
    shutil.rmtree(out_dir / "viz", ignore_errors=True)
    if viz_images > 0:
        write_detection_pictures(dets, records, out_dir / "viz", num_images=viz_images, min_score=viz_min_score,
                                 note="RANDOM WEIGHTS" if random_init else "")
    return m


def format_eval(ev: dict, random_init: bool) -> list[str]:
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if random_init else ""
    lines = [f"detections: {ev['detections']} on {ev['images']} images ({ev['images_without_detections']} without any)"]
    for f in (ev.get("unreadable_images") or [])[:10]:
        lines.append(f"  unreadable, skipped (a miss): {f['path']}: {f['error']}")
    if ev.get("corloc") is not None:
        lines.append(f"LOST+CAD CorLoc (top-1 box): {ev['corloc']:.2f} % ({ev['corloc_hits']}/{ev['corloc_total']}){tag}")
    if ev.get("AP50") is not None:
        lines.append(f"class-agnostic AP50 {ev['AP50']:.2f}, AP {ev['AP']:.2f} ({ev['ap_mode']} style, "
                     f"{ev['gt_images']} images with GT){tag}")
    return lines
