"""What the detector stages share (train-cag, train-cad, evaluate-cag, evaluate-cad's inference).

One trainer call path: :func:`run_training` (config -> validated COCO training set -> detector ->
``pipeline.detection.trainer.train`` -> detections + evaluation on the training images -> artifacts),
and one inference path: :func:`load_trained_detector` + :func:`detect_and_evaluate`.

Multi-GPU: the stages run unchanged under ``torchrun --nproc_per_node=N -m stages.train_cag`` (make
NPROC=N): every process trains its share of the global batch (DDP); only rank 0 evaluates and writes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import ArtifactError, read_coco_boxes, read_json, write_json
from stages.common import (Timer, build_dataset_from_cfg, coco_image_root, config_fingerprint,
                           export_submitit_distributed_env, resolve_device, to_container, up_to_date, warn_random)

STAGE_FILES = ("model.pt", "metrics.jsonl", "metrics.json", "detections.json", "manifest.json")


def detector_build_kwargs(cfg: DictConfig, num_classes: int) -> dict:
    """``build_detector`` arguments from the detector config (``schedule=smoke`` shrinks its sizes by a Hydra
    override of the detector keys)."""
    d = cfg.detector
    pick = {k: d[k] for k in ("min_size", "max_size", "test_min_size", "batch_size_per_image",
                              "rpn_batch_size_per_image", "rpn_topk")}
    sizes = pick["min_size"]
    init = str(d.init)
    return {"preset": str(d.preset), "num_classes": int(num_classes), "init": init,
            "weights": None if init == "random" or d.get("weights") is None else str(d.weights),
            "min_size": int(sizes) if isinstance(sizes, (int, float)) else [int(v) for v in sizes],
            "max_size": int(pick["max_size"]),
            "test_min_size": None if pick["test_min_size"] is None else int(pick["test_min_size"]),
            "batch_size_per_image": int(pick["batch_size_per_image"]),
            "rpn_batch_size_per_image": int(pick["rpn_batch_size_per_image"]),
            "rpn_topk": None if pick["rpn_topk"] is None else [int(v) for v in pick["rpn_topk"]],
            "nms": float(d.nms), "score_thresh": float(d.score_thresh),
            "detections_per_img": int(d.detections_per_img), "norm": str(d.get("norm") or "bn"),
            "seed": int(cfg.seed)}


def build_detector_from_kwargs(build: dict, rank: int = 0):
    from pipeline.detection.builders import build_detector

    kw = dict(build)
    model = build_detector(kw.pop("preset"), kw.pop("num_classes"), **kw)
    if build["init"] == "random" and rank == 0:
        warn_random(f"detector {build['preset']}", "detector.init=random")
    return model


def load_trained_detector(path: str | os.PathLike, hint: str):
    """(model in eval mode, checkpoint ``config``, iteration) from a train-cag/train-cad ``model.pt``.

    The model is rebuilt from the stored build arguments (no pretrained file needed) and loaded;
    frozen vs. trainable batch norms differ only by ``num_batches_tracked`` (same inference)."""
    import torch

    from pipeline.detection.builders import build_detector

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"detector checkpoint not found: {path}. {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ArtifactError(f"cannot read detector checkpoint {path} ({type(e).__name__}: {e}). {hint}") from None
    build = (ckpt.get("config") or {}).get("build") if isinstance(ckpt, dict) else None
    if not build or "model" not in ckpt:
        raise ArtifactError(f"{path} is not a checkpoint written by train-cag/train-cad (no build config). {hint}")
    kw = {**build, "init": "random", "weights": None}
    model = build_detector(kw.pop("preset"), kw.pop("num_classes"), **kw)
    res = model.load_state_dict(ckpt["model"], strict=False)
    bad = [k for k in [*res.missing_keys, *res.unexpected_keys] if not k.endswith("num_batches_tracked")]
    if bad:
        raise ArtifactError(f"{path}: weights do not fit the {build['preset']} detector it describes "
                            f"({len(bad)} keys, e.g. {bad[:3]}). Retrain with force=true.")
    model.detector_info = ckpt.get("detector_info") or {}
    return model.eval(), ckpt["config"], int(ckpt.get("iteration", 0))


def ap_mode(dataset_kind: str) -> str:
    """pycocotools AP style: VOC (difficult removed) for VOC datasets, COCO otherwise."""
    return "voc" if str(dataset_kind) in ("voc07", "voc12") else "coco"


def detect_and_evaluate(model, records, out_dir: Path, *, category_ids, mode: str, voc_difficult: str = "remove",
                        device: str = "cpu", batch_size: int = 2, progress: bool = False, viz_images: int = 0,
                        viz_min_score: float = 0.3, random_init: bool = False) -> dict:
    """Detect on ``records``; write ``out_dir``/detections.json (COCO results, ``image_id`` = coco_id) and
    ``viz/``; return metrics: LOST+CAD top-1 CorLoc and class-agnostic AP50/AP over the records with GT."""
    from pipeline.detection.inference import predict, to_coco_results
    from pipeline.detection.pictures import write_detection_pictures
    from pipeline.evaluation.coco_ap import corloc_top1, evaluate_ap

    t0 = time.time()
    dets = predict(model, records, device=device, batch_size=batch_size, progress=progress)
    results = to_coco_results(dets, list(category_ids))
    write_json(out_dir / "detections.json", results, indent=None)  # large: one line
    gt = [r for r in records if r.has_gt]
    m = {"images": len(records), "detections": len(results),
         "images_without_detections": sum(len(d["scores"]) == 0 for d in dets), "gt_images": len(gt),
         "ap_mode": mode if gt else None, "corloc": None, "corloc_hits": None, "corloc_total": None,
         "AP50": None, "AP": None, "AP75": None, "inference_seconds": round(time.time() - t0, 3)}
    if gt:
        ids = {int(r.coco_id) for r in gt}
        c = corloc_top1([d for d in dets if int(d["image_id"]) in ids], gt)
        ap = evaluate_ap(gt, [r for r in results if r["image_id"] in ids], mode=mode, class_agnostic=True,
                         voc_difficult=voc_difficult)
        m.update(corloc=c.corloc, corloc_hits=c.hits, corloc_total=c.total, AP50=ap["AP50"], AP=ap["AP"],
                 AP75=ap["AP75"], num_gt=ap["num_gt"])
    shutil.rmtree(out_dir / "viz", ignore_errors=True)
    if viz_images > 0:
        write_detection_pictures(dets, records, out_dir / "viz", num_images=viz_images, min_score=viz_min_score,
                                 note="RANDOM WEIGHTS" if random_init else "")
    return m


def training_set_records(cfg: DictConfig, coco: dict, root: Path) -> tuple[list, int]:
    """ImageRecords of the json's images that exist on disk, with the configured dataset's GT where the
    record has the same coco_id and path; (records, number of images missing on disk)."""
    from pipeline.data.records import ImageRecord
    from pipeline.detection.data import resolve_image_path

    gt = {int(r.coco_id): r for r in build_dataset_from_cfg(cfg).records if r.has_gt}
    out, missing = [], 0
    for im in coco["images"]:
        p = resolve_image_path(str(im["file_name"]), root)
        if not p.is_file():
            missing += 1
            continue
        r = gt.get(int(im["id"]))
        if r is not None and Path(r.path).resolve() == p.resolve():
            out.append(r)
        else:
            out.append(ImageRecord(str(im.get("dataset_id") or im["file_name"]), int(im["id"]), str(p),
                                   im.get("width"), im.get("height"), has_gt=False))
    return out, missing


def checkpoint_random_init(model, ckpt_config: dict) -> bool:
    """A trained detector is a smoke test when it started from random weights or learnt from boxes/labels
    that a random-weight backbone produced."""
    return (getattr(model, "detector_info", {}) or {}).get("init") == "random" or \
        bool(ckpt_config.get("boxes_random_init"))


def boxes_random_init(coco: dict) -> bool:
    info = coco.get("info") or {}
    return bool(info.get("random_init") or (info.get("clustering") or {}).get("random_init"))


def _device(cfg: DictConfig, world: int) -> str:
    device = resolve_device(str(cfg.device))
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _check_resume(ckpt_path: Path, fingerprint: str) -> None:
    import torch

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"cannot resume from {ckpt_path} ({type(e).__name__}: {e}); start over with force=true")
    if (ckpt.get("config") or {}).get("fingerprint") != fingerprint:
        raise ArtifactError(f"cannot resume from {ckpt_path}: it was trained with a different configuration "
                            "(detector, schedule, dataset or input); restore that configuration, or start over "
                            "with force=true (FORCE=1)")


def run_training(cfg: DictConfig, *, stage: str, section: str, in_path: Path, what: str, hint: str,
                 class_agnostic: bool, fingerprint_keys: tuple[str, ...]) -> dict | None:
    """The whole train-cag / train-cad stage (see the module docstring). None on ranks > 0 and when the
    run stopped early (``<section>.stop_after``)."""
    import torch.distributed as dist

    from pipeline.artifacts import write_manifest
    from pipeline.detection.data import DetectionDataset
    from pipeline.detection.trainer import init_distributed, train

    timer = Timer()
    export_submitit_distributed_env()
    rank, world = init_distributed()
    sec, sch, stage_dir = cfg[section], cfg.schedule, Path(cfg.stage_dir)
    fp = config_fingerprint(cfg, *fingerprint_keys)
    outputs = ("model.pt", "metrics.json") + (("detections.json",) if cfg.eval.enabled else ())
    if not cfg.force and up_to_date(stage_dir, fp, outputs):
        if rank == 0:
            print(f"{stage}: {stage_dir} is up to date (same config and input, complete); FORCE=1 (force=true) "
                  "redoes it.", flush=True)
        return read_json(stage_dir / "metrics.json") if rank == 0 else None
    if cfg.force and rank == 0:
        for name in STAGE_FILES:
            (stage_dir / name).unlink(missing_ok=True)
        shutil.rmtree(stage_dir / "viz", ignore_errors=True)
    if world > 1:
        dist.barrier()
    coco = read_coco_boxes(in_path, what, hint)
    root = coco_image_root(cfg, coco, override=sec.get("image_root"), fallback=in_path.parent)
    try:
        dataset = DetectionDataset(in_path, root, class_agnostic=class_agnostic,
                                   min_box_size=float(sec.min_box_size), what=what)
    except ValueError as e:  # empty file, nothing trainable: one clear line, exit 2
        raise ArtifactError(str(e)) from None
    eval_records, eval_missing = training_set_records(cfg, coco, root) if cfg.eval.enabled and rank == 0 else ([], 0)
    build = detector_build_kwargs(cfg, dataset.num_classes)
    model = build_detector_from_kwargs(build, rank)
    ckpt_path = stage_dir / "model.pt"
    if sec.resume and ckpt_path.is_file():
        _check_resume(ckpt_path, fp)
    elif ckpt_path.is_file() and rank == 0:
        print(f"{stage}: training from scratch over {ckpt_path} ({section}.resume=true continues it instead)",
              flush=True)
    device = _device(cfg, world)
    state = {"stage": stage, "fingerprint": fp, "build": build, "category_ids": dataset.category_ids,
             "boxes_random_init": boxes_random_init(coco),
             "category_names": dataset.category_names, "input": str(in_path), "config": to_container(cfg)}
    res = train(model, dataset, out_dir=stage_dir, iterations=int(sch.iterations), batch_size=int(sch.batch_size),
                lr=float(sch.lr), momentum=float(sch.momentum), weight_decay=float(sch.weight_decay),
                warmup_iters=int(sch.warmup_iters), warmup_factor=float(sch.warmup_factor),
                steps=[int(s) for s in sch.steps], gamma=float(sch.gamma),
                checkpoint_period=int(sch.checkpoint_period), seed=int(cfg.seed), resume=bool(sec.resume),
                amp=bool(sch.amp), clip_grad=None if sch.clip_grad is None else float(sch.clip_grad),
                num_workers=int(cfg.num_workers), device=device, log_period=int(sch.log_period),
                progress=bool(cfg.progress), stop_after=sec.get("stop_after"), extra_state=state)
    if rank != 0:
        return None
    if res.stopped_early:
        print(f"{stage}: stopped after iteration {res.iteration} of {sch.iterations} ({section}.stop_after); "
              f"{section}.resume=true continues from {ckpt_path}", flush=True)
        return None
    info = model.detector_info
    metrics = {"stage": stage, "input": str(in_path), "iterations": res.iteration,
               "start_iteration": res.start_iteration, "resumed": res.start_iteration > 0,
               "final_loss": res.losses[-1] if res.losses else None, "train_seconds": round(timer.elapsed, 3),
               "num_classes": dataset.num_classes, "category_ids": dataset.category_ids,
               "dataset_stats": dict(dataset.stats), "missing_images": dataset.missing_images[:50],
               "detector": info["preset"], "detector_init": info["init"],
               "detector_random_init": info["init"] == "random", "boxes_random_init": boxes_random_init(coco)}
    metrics["random_init"] = metrics["detector_random_init"] or metrics["boxes_random_init"]
    if cfg.eval.enabled:
        ev = detect_and_evaluate(model, eval_records, stage_dir, category_ids=dataset.category_ids,
                                 mode=ap_mode(cfg.dataset.kind), voc_difficult=str(cfg.eval.voc_difficult),
                                 device=device, batch_size=int(cfg.eval.batch_size), progress=bool(cfg.progress),
                                 viz_images=int(cfg.viz.num_images), viz_min_score=float(cfg.viz.min_score),
                                 random_init=metrics["random_init"])
        metrics["eval"] = {**ev, "images_missing": eval_missing}
    write_json(stage_dir / "metrics.json", metrics)
    write_manifest(stage_dir, stage=stage, config=to_container(cfg), inputs={section_input(section): in_path},
                   weights_sha256=info.get("weights_sha256"), start_time=timer.start, end_time=time.time(),
                   extra={"fingerprint": fp, "iteration": res.iteration, "random_init": metrics["random_init"]})
    print_summary(stage, stage_dir, metrics)
    return metrics


def section_input(section: str) -> str:
    return {"train_cag": "pseudo_boxes", "train_cad": "pseudo_labels"}.get(section, "boxes")


def format_eval(ev: dict, random_init: bool) -> list[str]:
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if random_init else ""
    lines = [f"detections: {ev['detections']} on {ev['images']} images ({ev['images_without_detections']} without any)"]
    if ev.get("corloc") is not None:
        lines.append(f"LOST+CAD CorLoc (top-1 box): {ev['corloc']:.2f} % ({ev['corloc_hits']}/{ev['corloc_total']}){tag}")
    if ev.get("AP50") is not None:
        lines.append(f"class-agnostic AP50 {ev['AP50']:.2f}, AP {ev['AP']:.2f} ({ev['ap_mode']} style, "
                     f"{ev['gt_images']} images with GT){tag}")
    return lines


def print_summary(stage: str, stage_dir: Path, m: dict) -> None:
    s = m["dataset_stats"]
    lines = [f"{stage}: {m['iterations']} iterations ({'resumed at ' + str(m['start_iteration']) if m['resumed'] else 'from scratch'}), "
             f"{m['num_classes']} class(es), final loss {m['final_loss'] if m['final_loss'] is None else round(m['final_loss'], 4)}",
             f"training set: {s['images_used']} images, {s['boxes_used']} boxes used; dropped: "
             f"{s['images_missing']} missing images, {s['images_size_mismatch']} size mismatches, "
             f"{s['images_without_boxes']} images without boxes, {s['boxes_degenerate']} degenerate boxes, "
             f"{s['boxes_unknown_category']} boxes of unknown category ({s['boxes_clipped']} clipped)"]
    for p in m["missing_images"][:5]:
        lines.append(f"  missing: {p}")
    if "eval" in m:
        lines += format_eval(m["eval"], m["random_init"])
    lines.append(f"artifacts: {stage_dir}/ (model.pt, metrics.jsonl, metrics.json, detections.json, viz/, manifest.json)")
    print("\n".join(lines), flush=True)
