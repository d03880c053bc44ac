"""Running a trained detector on records and reporting it, for every job that does (training, evaluate-cag,
evaluate-cad's inference).

:func:`detect_score_draw` composes three steps: detection (:func:`pipeline.detection.inference.predict`,
written as detections.json), scoring (:func:`pipeline.evaluation.detections.score_detections`) and pictures
(``viz/``), as the ``eval`` and ``viz`` settings say; :func:`format_eval` is the scores as console lines.
Loading the detector is :func:`pipeline.detection.checkpoint.load_detector`; "random weights" is
:func:`pipeline.provenance.random_init`.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from pipeline import runtime
from pipeline.artifacts import ArtifactError, write_json
from pipeline.evaluation.settings import EvalSettings
from pipeline.viz.settings import VizSettings


def job_device(name: str, world: int = 1) -> str:
    """:func:`pipeline.runtime.resolve_device` of ``name``, its refusal an :class:`ArtifactError` (one error
    line); under DDP (``world`` > 1) on CUDA, this process's GPU (``LOCAL_RANK``)."""
    try:
        device = runtime.resolve_device(name)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def warn_if_random(spec, model_path: Path, random_init: bool, what: str = "pseudo-boxes") -> None:
    """The random-weights banner when the detector at ``model_path`` rests on random weights (its own, or
    those that made ``what`` it learnt from)."""
    if random_init:
        runtime.warn_random(f"detector {spec.preset}",
                            f"{model_path} was trained from random weights (detector or {what})")


def detect_score_draw(model, records: Sequence, out_dir: Path, *, category_ids: Sequence[int], mode: str,
                      evaluation: EvalSettings, viz: VizSettings | None = None, device: str = "cpu",
                      progress: bool = False, random_init: bool = False) -> dict:
    """Detect on ``records`` (``evaluation.batch_size`` images at a time); write ``out_dir``/detections.json (COCO
    results, ``image_id`` = coco_id, ``category_id = category_ids[label - 1]``) and ``out_dir``/viz/ (``viz``'s
    pictures; none without ``viz``); return the scores (LOST+CAD top-1 CorLoc, class-agnostic AP50/AP in ``mode``
    over the records with GT) with ``inference_seconds`` and the ``unreadable_images`` (skipped, a miss)."""
    from pipeline.detection.inference import predict, to_coco_results
    from pipeline.evaluation.detections import score_detections
    from pipeline.viz.detections import write_detection_pictures

    t0 = time.time()
    unreadable: list[dict] = []
    dets = predict(model, records, device=device, batch_size=evaluation.batch_size, progress=progress,
                   failures=unreadable)
    write_json(out_dir / "detections.json", to_coco_results(dets, list(category_ids)), indent=None)  # one line
    seconds = round(time.time() - t0, 3)
    m = score_detections(dets, records, mode=mode, voc_difficult=evaluation.voc_difficult)
    m["inference_seconds"] = seconds
    m["unreadable_images"] = unreadable  # skipped (a miss for CorLoc), listed: never a traceback
    shutil.rmtree(out_dir / "viz", ignore_errors=True)
    if viz is not None and viz.num_images > 0:
        write_detection_pictures(dets, records, out_dir / "viz", num_images=viz.num_images, min_score=viz.min_score,
                                 note="RANDOM WEIGHTS" if random_init else "")
    return m


def format_eval(ev: dict, random_init: bool) -> list[str]:
    """The console lines of :func:`detect_score_draw`'s scores (tagged when the weights were random)."""
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if random_init else ""
    lines = [f"detections: {ev['detections']} on {ev['images']} images ({ev['images_without_detections']} without any)"]
    for f in (ev.get("unreadable_images") or [])[:10]:
        lines.append(f"  unreadable, skipped (a miss): {f['path']}: {f['error']}")
    if ev.get("corloc") is not None:
        lines.append(f"LOST+CAD CorLoc (top-1 box): {ev['corloc']:.2f} % ({ev['corloc_hits']}/{ev['corloc_total']}){tag}")
    if ev.get("AP50") is not None:
        lines.append(f"class-agnostic AP50 {ev['AP50']:.2f}, AP {ev['AP']:.2f} ({ev['ap_mode']} style, "
                     f"{ev['gt_images']} images with GT){tag}")
    if ev.get("mask"):
        m = ev["mask"]
        lines.append(f"class-agnostic mask AP50 {m['AP50']:.2f}, AP {m['AP']:.2f}, AP75 {m['AP75']:.2f}, "
                     f"AR100 {m['AR100']:.2f}{tag}")
    return lines
