"""A trained detector on an evaluation set: evaluate-cag's job (:func:`evaluate_detector`: detections, CorLoc,
AP) and evaluate-cad's (:func:`cached_detections`: the class-aware detector's detections.json, made once per
model file and image list; :func:`evaluate_clusters`: clusters matched to classes, per-class AP). Plain
parameters; the stages read the config."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.artifacts import (ArtifactError, read_json, sha256_file, sha256_json, write_json, write_manifest,
                                write_text)
from pipeline.detection.report import detect_score_draw, format_eval, job_device, warn_if_random
from pipeline.evaluation.settings import EvalSettings
from pipeline.provenance import random_init as is_random
from pipeline.viz.settings import VizSettings


def load_trained(model_path: Path, hint: str = "", what: str = "pseudo-boxes") -> tuple:
    """(model, spec, meta, random_init) of the detector at ``model_path``; the banner when it rests on random
    weights (its own or those that made the ``what`` it learnt from)."""
    from pipeline.detection.checkpoint import load_detector

    model, spec, meta = load_detector(model_path, hint=hint)
    random_init = is_random(spec=spec, provenance=meta["provenance"])
    warn_if_random(spec, model_path, random_init, what)
    return model, spec, meta, random_init


def evaluate_detector(model_path: Path, records: Callable[[], Sequence], out_dir: Path, *, mode: str,
                      evaluation: EvalSettings, viz: VizSettings, device: str, progress: bool, config: dict,
                      dataset: str, image_set: str | None, hint: str = "", force: bool = False,
                      redo: str = "force=True redoes it") -> dict:
    """The detector at ``model_path`` on ``records()`` -> ``out_dir``/detections.json, metrics.json (scores in
    ``mode``, the model and ``dataset``:``image_set`` evaluated), viz/, manifest.json (``config``); the metrics.
    ``hint``: how to get the model, when it cannot be loaded. Up to date (nothing done) when ``out_dir`` holds the
    evaluation of the same model file, images and settings, unless ``force`` (``redo``: how the caller's user asks).
    """
    import dataclasses

    start = time.time()
    if not model_path.is_file():  # before the images are listed: a missing model is said at once
        raise ArtifactError(f"detector checkpoint not found: {model_path}. {hint}".strip())
    images = records()
    key = sha256_json({"model": sha256_file(model_path), "images": _images_key(images), "mode": mode,
                       "eval": dataclasses.asdict(evaluation), "viz": dataclasses.asdict(viz)})
    done = read_json(out_dir / "manifest.json") if (out_dir / "manifest.json").is_file() else {}
    if not force and done.get("evaluated") == key and (out_dir / "metrics.json").is_file():
        print(f"evaluate-cag: {out_dir} is up to date (the same model, images and settings); {redo}.", flush=True)
        return read_json(out_dir / "metrics.json")
    model, spec, meta, random_init = load_trained(model_path, hint)
    iteration = meta["iteration"]
    ev = detect_score_draw(model, images, out_dir, category_ids=spec.category_ids, mode=mode, evaluation=evaluation,
                           viz=viz, device=job_device(device), progress=progress, random_init=random_init)
    metrics = {**ev, "model": str(model_path), "model_iteration": iteration,
               "model_stage": meta["provenance"].get("stage"), "dataset": dataset, "image_set": image_set,
               "detector": spec.preset, "random_init": random_init}
    write_json(out_dir / "metrics.json", metrics)
    write_manifest(out_dir, stage="evaluate_cag", config=config, inputs={"model": model_path},
                   weights_sha256=spec.weights_sha256, start_time=start, end_time=time.time(), extra={"evaluated": key})
    print("\n".join([f"evaluate-cag: {model_path} (iteration {iteration}) on {dataset}:{image_set}",
                     *format_eval(ev, random_init),
                     f"artifacts: {out_dir}/ (detections.json, metrics.json, viz/, manifest.json)"]), flush=True)
    return metrics


def _images_key(records: Sequence) -> str:
    return sha256_json(sorted((int(r.coco_id), str(Path(r.path).resolve())) for r in records))


def cached_detections(stage_dir: Path, model_path: Path, records: Sequence, gt_desc: str, *, mode: str,
                      batch_size: int, device: str, progress: bool, hint: str = "",
                      model_hint: str = "") -> tuple[Path, dict | None]:
    """``stage_dir``/detections.json of the class-aware detector at ``model_path`` on ``records`` (of ``gt_desc``),
    and its inference record (``inference.json``: the model file, its sha256, the image list, the categories
    and the class-agnostic scores in ``mode``). Reused when the record names the same model file and images,
    else made by running the model (no pictures). Without a model: an existing detections.json (no record), else
    FileNotFoundError (``hint``: how to get either); ``model_hint``: how to get a model that loads."""
    det_path, side_path = stage_dir / "detections.json", stage_dir / "inference.json"
    if not model_path.is_file():
        if det_path.is_file():
            return det_path, None
        raise FileNotFoundError(f"no detections to evaluate: neither {det_path} nor the class-aware detector "
                                f"{model_path} exists. {hint}".strip())
    side = {"model": str(model_path), "model_sha256": sha256_file(model_path), "images_key": _images_key(records)}
    prev = read_json(side_path, "inference record") if side_path.is_file() else {}
    if det_path.is_file() and all(prev.get(k) == v for k, v in side.items() if k != "model"):
        print(f"evaluate-cad: reusing {det_path} (made by the same {model_path} on the same images)", flush=True)
        return det_path, prev
    model, spec, meta, random_init = load_trained(model_path, model_hint, "pseudo-labels")
    iteration, cats = meta["iteration"], list(spec.category_ids)
    print(f"evaluate-cad: running {model_path} (iteration {iteration}) on {len(records)} images of {gt_desc}", flush=True)
    ev = detect_score_draw(model, records, stage_dir, category_ids=cats, mode=mode,
                           evaluation=EvalSettings(batch_size=batch_size), device=job_device(device), progress=progress,
                           random_init=random_init)
    names = list(spec.category_names or [])
    side.update({"iteration": iteration, "category_ids": cats, "gt": gt_desc,
                 "category_names": {str(c): n for c, n in zip(cats, names)},
                 "random_init": random_init, "class_agnostic": ev})
    write_json(side_path, side)
    return det_path, side


def evaluate_clusters(det_path: Path, inferred: dict | None, records: Sequence, class_names: Sequence[str],
                      gt_desc: str, out_dir: Path, *, config: dict, start: float, hint: str = "",
                      num_clusters: int | None = None, **matching) -> dict:
    """The detections at ``det_path`` (COCO results, ``category_id`` = cluster; ``inferred``: their inference
    record, :func:`cached_detections`) matched to the classes of ``records`` (``gt_desc``) by
    :func:`pipeline.evaluation.hungarian.hungarian_evaluate` (``num_clusters``, ``matching``: its settings) ->
    ``out_dir``/metrics.json, hungarian.md, manifest.json (``config``, ``start`` time); the metrics. A file
    that does not fit the ground truth is an ArtifactError naming it (``hint``: how to get detections)."""
    from pipeline.evaluation.hungarian import hungarian_evaluate, to_markdown

    dets = read_json(det_path, "detections file", hint=hint)
    if not isinstance(dets, list):
        raise ArtifactError(f"{det_path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    inf = inferred or {}
    names = {int(c): n for c, n in (inf.get("category_names") or {}).items()}
    try:
        res = hungarian_evaluate(dets, records, class_names, category_names=names or None,
                                 cluster_ids=None if num_clusters is not None else inf.get("category_ids"),
                                 num_clusters=num_clusters, **matching)
    except ValueError as e:
        raise ArtifactError(f"{det_path}: {e}") from None
    res.update({"detections": str(det_path), "gt": gt_desc})
    if any("segmentation" in d for d in dets) and any(r.has_masks for r in records):
        from pipeline.evaluation.matched_masks import matched_mask_ap

        masks = matched_mask_ap(dets, records, res["matching"])
        for name, m in masks.items():
            res["per_class"][name].update(m)
        res["mean"].update({k: sum(m[k] for m in masks.values()) / len(res["per_class"])
                            for k in ("mask_AP50", "mask_AP")} if masks else {})
    if inferred is not None:
        res["inference"] = inferred
    write_json(out_dir / "metrics.json", res)
    table = to_markdown(res, names or None)
    write_text(out_dir / "hungarian.md", f"# Hungarian evaluation\n\nDetections: `{det_path}`  \nGT: `{gt_desc}`"
               f"\n\n{table}")
    inputs = {"detections": det_path, **({"model": Path(inferred["model"])} if inferred else {})}
    write_manifest(out_dir, stage="evaluate_cad", config=config, inputs=inputs, start_time=start, end_time=time.time())
    made = "detections.json, inference.json, " if inferred else ""
    tag = "\n[RANDOM WEIGHTS: smoke test, not a result]" if inf.get("random_init") else ""
    print(table + f"\nmatching (class -> cluster): {res['matching']}{tag}\nartifacts: {out_dir}/ ({made}metrics.json, "
          "hungarian.md, manifest.json)", flush=True)
    return res
