"""The shared entry of the two training stages (train-cag, train-cad): :func:`run_training`.

config -> validated COCO training set -> :class:`~pipeline.detection.checkpoint.DetectorSpec` -> detector ->
:func:`pipeline.detection.trainer.train` (a :class:`~pipeline.detection.trainer.Schedule` and a
:class:`~pipeline.detection.checkpoint.Checkpointer`) -> detections + scores + pictures on the training
images (:func:`stages.detector_common.detect_score_draw`) -> metrics.json, manifest.json.

What decides the artifact vs. the report. ``model.pt`` stores its *artifact config*: the stage's
``artifact_keys`` (dataset, backbone, [miner,] detector, schedule, seed, ``<section>``.boxes/labels/
cluster_run/image_root/min_box_size) and the input file's sha256. The *report* keys (``REPORT_KEYS``:
eval, viz, progress, num_workers, device) decide only detections.json, metrics.json's ``eval`` and viz/.
``force``, ``<section>.resume``/``stop_after`` and ``stage_dir`` are controls, in neither. A rerun:

The finished stage's manifest.json records both (the same rule as every stage, :func:`pipeline.rerun.plan_rerun`).

- same artifact and report config, outputs complete (the input's hash is part of the artifact): "up to date";
- same artifact config, model.pt complete: only inference/evaluation/pictures are redone on it
  (model.pt and metrics.jsonl untouched, no training);
- same artifact config, model.pt partial: ``<section>.resume=true`` continues it exactly, otherwise an error;
- another artifact config over an existing model.pt (complete or partial, resume or not): an error naming
  the changed keys (``schedule.lr: 0.005 -> 0.01``); FORCE=1 (force=true) deletes the outputs and retrains.

Multi-GPU: the stages run unchanged under ``torchrun --nproc_per_node=N -m stages.train_cag`` (make
NPROC=N): every process trains its share of the global batch (DDP); only rank 0 evaluates and writes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (ArtifactError, begin_replacement, commit_replacement, read_coco_boxes, read_json,
                                recover_replacement, replacement_dir, write_json)
from pipeline.rerun import diff_values, explain_changes, format_changes, plan_rerun
from stages.common import (Timer, build_dataset_from_cfg, coco_image_root, dataset_identity,
                           export_submitit_distributed_env, resolve_device, to_container, warn_random)
from stages.detector_common import detect_score_draw, format_eval

# what decides only the report made from a trained model (not its weights)
REPORT_KEYS = ("eval", "viz", "progress", "num_workers", "device")


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


def training_set_records(cfg: DictConfig, coco: dict, root: Path) -> tuple[list, int, int]:
    """ImageRecords of the json's images that exist on disk, with the configured dataset's GT where the
    record has the same coco_id and path; (records, images missing on disk, images left out because mining
    failed on them: ``mining_error``, unreadable or smaller than a patch; no detector runs on them)."""
    from pipeline.data.records import ImageRecord
    from pipeline.data.paths import resolve_image_path

    gt = {int(r.coco_id): r for r in build_dataset_from_cfg(cfg).records if r.has_gt}
    out, missing, failed = [], 0, 0
    for im in coco["images"]:
        if im.get("mining_error"):
            failed += 1
            continue
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
    return out, missing, failed


def _device(cfg: DictConfig, world: int) -> str:
    device = resolve_device(str(cfg.device))
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def artifact_config(cfg: DictConfig, keys: Sequence[str], in_path: Path) -> dict:
    """What decides the trained weights: the config entries ``keys`` (resolved; the dataset with its paths
    resolved, :func:`stages.common.dataset_identity`) and the input file's sha256. Stored in model.pt and
    compared on every rerun."""
    from pipeline.artifacts import sha256_file

    plain = {k: (dataset_identity(cfg) if k == "dataset" else _plain(OmegaConf.select(cfg, k))) for k in keys}
    return {**plain, "input_sha256": sha256_file(in_path)}


def report_config(cfg: DictConfig) -> dict:
    """What decides only the report made from the weights (detections, scores, pictures, speed)."""
    return {k: _plain(OmegaConf.select(cfg, k)) for k in REPORT_KEYS}


def decide(ckpt_path: Path, artifact: dict, *, resume: bool, section: str, inputs: dict | None = None) -> str:
    """What to do with an existing ``model.pt`` given this run's artifact config: ``"train"`` (none there),
    ``"resume"`` (partial, ``resume=true``, same artifact config) or ``"report"`` (complete, same artifact
    config: only inference/evaluation/pictures are redone). Anything else is an :class:`ArtifactError`
    naming the changed keys: a model is never overwritten without ``force=true``."""
    from pipeline.detection.checkpoint import read_checkpoint

    if not ckpt_path.is_file():
        return "train"
    ckpt = read_checkpoint(ckpt_path, mmap=True)
    changes = explain_changes(diff_values(ckpt.get("artifact_config") or {}, artifact), inputs)
    done, target = int(ckpt.get("iteration", 0)), (ckpt.get("schedule") or {}).get("iterations")
    del ckpt
    if changes:
        what = "cannot resume from" if resume else "will not overwrite"
        state = "a finished model" if done >= int(target or 0) else f"a partial training (iteration {done} of {target})"
        raise ArtifactError(f"{what} {ckpt_path}: {state} trained with a different configuration ({format_changes(changes)}). "
                            "Restore that configuration, write elsewhere (stage_dir=...), or retrain over it with "
                            "FORCE=1 (force=true)")
    if target is not None and done >= int(target):
        return "report"
    if not resume:
        raise ArtifactError(f"will not overwrite {ckpt_path}: it holds a partial training (iteration {done} of {target}) "
                            f"of this configuration; {section}.resume=true continues it, FORCE=1 (force=true) starts over")
    return "resume"


def _previous_training(stage_dir: Path, iteration: int) -> dict:
    """The training summary of the run that wrote model.pt (its metrics.json, else its metrics.jsonl)."""
    try:
        m = read_json(stage_dir / "metrics.json")
        if int(m.get("iterations", -1)) == iteration:
            return {k: m.get(k) for k in ("start_iteration", "resumed", "final_loss", "train_seconds")}
    except Exception:  # noqa: BLE001 - missing or unreadable: fall back to the training log
        pass
    import json

    final = None
    log = stage_dir / "metrics.jsonl"
    if log.is_file():
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        final = next((ln.get("loss") for ln in reversed(lines) if ln.get("iteration") == iteration), None)
    return {"start_iteration": None, "resumed": None, "final_loss": final, "train_seconds": None}


def run_training(cfg: DictConfig, *, stage: str, section: str, in_path: Path, what: str, hint: str,
                 class_agnostic: bool, artifact_keys: Sequence[str], producer: str = "") -> dict | None:
    """The whole train-cag / train-cad stage (see the module docstring). None on ranks > 0 and when the
    run stopped early (``<section>.stop_after``). ``producer`` says which step writes ``in_path`` (for the
    message when it changed: " (written by `make mine`)")."""
    import torch.distributed as dist

    from pipeline.artifacts import write_manifest
    from pipeline.detection.checkpoint import Checkpointer, DetectorSpec, load_detector
    from pipeline.detection.data import DetectionDataset
    from pipeline.detection.trainer import Schedule, init_distributed, train
    from pipeline.evaluation.detections import ap_mode
    from pipeline.provenance import coco_random_init, random_init
    from pipeline.status import annotations_digest

    timer = Timer()
    export_submitit_distributed_env()
    rank, world = init_distributed()
    sec, stage_dir = cfg[section], Path(cfg.stage_dir)
    if rank == 0:
        recover_replacement(stage_dir)
    try:
        sch = Schedule.from_dict(to_container(cfg.schedule))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"schedule: {e}") from None
    coco = read_coco_boxes(in_path, what, hint)
    artifact, report = artifact_config(cfg, artifact_keys, in_path), report_config(cfg)
    outputs = ("model.pt", "metrics.json") + (("detections.json",) if cfg.eval.enabled else ())
    inputs = {"input_sha256": f"the input {in_path}{producer}"}
    plan = plan_rerun(stage_dir, stage=stage, artifact=artifact, report=report, outputs=outputs, force=bool(cfg.force),
                      inputs=inputs)
    if plan.action == "skip":
        if rank == 0:
            print(f"{stage}: {stage_dir} is up to date (same config and input, complete); FORCE=1 (force=true) "
                  "redoes it.", flush=True)
        return read_json(stage_dir / "metrics.json") if rank == 0 else None
    # FORCE trains beside the finished results and swaps them in when complete: a forced run that fails or
    # is killed leaves them whole (with resume=true the same command continues its checkpoint).
    out_dir = replacement_dir(stage_dir) if cfg.force else stage_dir
    if cfg.force and rank == 0:
        begin_replacement(stage_dir, keep=bool(sec.resume))
    if world > 1:
        dist.barrier()
    ckpt_path = out_dir / "model.pt"
    try:
        mode = decide(ckpt_path, artifact, resume=bool(sec.resume), section=section, inputs=inputs)
    except ArtifactError:
        if not cfg.force:
            raise
        if rank == 0:  # a killed forced run of another configuration: FORCE starts over beside the results
            begin_replacement(stage_dir, keep=False)
        if world > 1:
            dist.barrier()
        mode = "train"
    root = coco_image_root(cfg, coco, override=sec.get("image_root"), fallback=in_path.parent)
    try:
        dataset = DetectionDataset(in_path, root, class_agnostic=class_agnostic,
                                   min_box_size=float(sec.min_box_size), what=what, hint=hint)
    except ValueError as e:  # empty file, nothing trainable: one clear line, exit 2
        raise ArtifactError(str(e)) from None
    eval_records, eval_missing, eval_failed = training_set_records(cfg, coco, root) if cfg.eval.enabled and rank == 0 \
        else ([], 0, 0)
    device = _device(cfg, world)
    if mode != "report":  # before minutes of set-up and a silent kill by the kernel
        from pipeline.detection.memory import check_train_memory

        d = cfg.detector
        side = d.min_size if isinstance(d.min_size, (int, float)) else max(d.min_size)
        too_much = check_train_memory(str(d.preset), max(1, sch.batch_size // world), int(side), device,
                                      rois_per_image=int(d.batch_size_per_image),
                                      amp=sch.amp and device.startswith("cuda"))
        if too_much:
            raise ArtifactError(too_much)
    if mode == "report":
        if rank != 0:
            return None
        changes = "; ".join(plan.report_changes) or "report outputs missing or incomplete"
        print(f"{stage}: {ckpt_path} is complete for this configuration; only the report changed "
              f"({changes}): re-running inference, evaluation and pictures on it "
              "(model.pt and metrics.jsonl are kept)", flush=True)
        model, spec, meta = load_detector(ckpt_path)
        iteration = meta["iteration"]
        trained = _previous_training(out_dir, iteration)
    else:
        build = detector_build_kwargs(cfg, dataset.num_classes)
        spec = DetectorSpec.from_build_kwargs(build, category_ids=dataset.category_ids,
                                              category_names=dataset.category_names)
        model = spec.build_model()
        if spec.random_init and rank == 0:
            warn_random(f"detector {spec.preset}", "detector.init=random")
        provenance = {"stage": stage, "input": str(in_path), "input_sha256": artifact["input_sha256"],
                      "boxes_random_init": coco_random_init(coco)}
        ckpt = Checkpointer(ckpt_path, spec=spec, schedule=sch.to_dict(), artifact_config=artifact,
                            provenance=provenance)
        res = train(model, dataset, sch, out_dir=out_dir, seed=int(cfg.seed), resume=mode == "resume",
                    num_workers=int(cfg.num_workers), device=device, progress=bool(cfg.progress),
                    stop_after=sec.get("stop_after"), checkpointer=ckpt)
        if rank != 0:
            return None
        if res.stopped_early:
            again = f"FORCE=1 with {section}.resume=true" if cfg.force else f"{section}.resume=true"
            print(f"{stage}: stopped after iteration {res.iteration} of {sch.iterations} ({section}.stop_after); "
                  f"{again} continues from {ckpt_path}", flush=True)
            return None
        iteration = res.iteration
        trained = {"start_iteration": res.start_iteration, "resumed": res.start_iteration > 0,
                   "final_loss": res.losses[-1] if res.losses else None, "train_seconds": round(timer.elapsed, 3)}
    boxes_random = coco_random_init(coco)
    metrics = {"stage": stage, "input": str(in_path), "iterations": iteration, **trained,
               "model_reused": mode == "report",
               "num_classes": dataset.num_classes, "category_ids": dataset.category_ids,
               "dataset_stats": dict(dataset.stats), "missing_images": dataset.missing_images[:50],
               "detector": spec.preset, "detector_init": spec.init,
               "detector_random_init": spec.random_init, "boxes_random_init": boxes_random}
    metrics["random_init"] = random_init(spec=spec, coco=coco)
    if cfg.eval.enabled:
        ev = detect_score_draw(model, eval_records, out_dir, category_ids=spec.category_ids,
                               mode=ap_mode(cfg.dataset.kind), voc_difficult=str(cfg.eval.voc_difficult),
                               device=device, batch_size=int(cfg.eval.batch_size), progress=bool(cfg.progress),
                               viz_images=int(cfg.viz.num_images), viz_min_score=float(cfg.viz.min_score),
                               random_init=metrics["random_init"])
        metrics["eval"] = {**ev, "images_missing": eval_missing, "images_failed_in_mining": eval_failed}
    write_json(out_dir / "metrics.json", metrics)
    write_manifest(out_dir, stage=stage, config=to_container(cfg), inputs={section_input(section): in_path},
                   weights_sha256=spec.weights_sha256, start_time=timer.start, end_time=time.time(),
                   extra={"artifact": artifact, "report": report, "iteration": iteration,
                          "random_init": metrics["random_init"], "model_reused": mode == "report",
                          "annotations_digest": annotations_digest(eval_records) if eval_records else None})
    if out_dir != stage_dir:
        commit_replacement(stage_dir, out_dir)
    print_summary(stage, stage_dir, metrics)
    return metrics

def section_input(section: str) -> str:
    return {"train_cag": "pseudo_boxes", "train_cad": "pseudo_labels"}.get(section, "boxes")


def print_summary(stage: str, stage_dir: Path, m: dict) -> None:
    s = m["dataset_stats"]
    how = "model.pt reused, not retrained" if m.get("model_reused") else \
        ("resumed at " + str(m["start_iteration"]) if m["resumed"] else "from scratch")
    lines = [f"{stage}: {m['iterations']} iterations ({how}), "
             f"{m['num_classes']} class(es), final loss {m['final_loss'] if m['final_loss'] is None else round(m['final_loss'], 4)}",
             f"training set: {s['images_used']} images, {s['boxes_used']} boxes used; dropped: "
             f"{s['images_missing']} missing images, {s['images_size_mismatch']} size mismatches, "
             f"{s['images_without_boxes']} images without boxes, {s['boxes_degenerate']} degenerate boxes, "
             f"{s['boxes_unknown_category']} boxes of unknown category ({s['boxes_clipped']} clipped)"]
    for p in m["missing_images"][:5]:
        lines.append(f"  missing: {p}")
    if "eval" in m:
        if m["eval"].get("images_failed_in_mining"):
            lines.append(f"left out of the detection pass: {m['eval']['images_failed_in_mining']} image(s) mining "
                         "failed on (listed in the mine stage's metrics.json)")
        lines += format_eval(m["eval"], m["random_init"])
    made = ["metrics.json", "manifest.json"] if m.get("model_reused") else \
        ["model.pt", "metrics.jsonl", "metrics.json", "manifest.json"]
    if "eval" in m:
        made.insert(-1, "detections.json")
        if any((stage_dir / "viz").glob("*.png")):
            made.insert(-1, "viz/")
    lines.append(f"artifacts: {stage_dir}/ ({', '.join(made)})")
    print("\n".join(lines), flush=True)
