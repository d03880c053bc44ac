"""The shared entry of the two training stages (train-cag, train-cad): :func:`run_training`, which reads top
to bottom as detectron2's ``do_train``: plan (:func:`pipeline.rerun.plan_rerun` on the finished results,
:func:`pipeline.rerun.plan_checkpoint` on model.pt, device memory) -> data (the COCO training set, the records
the report runs on) -> model (a ``DetectorSpec`` of the configured ``DetectorSettings``) -> train (model on its
device, ``build_optimizer``, ``build_scheduler``, the loader, DDP, the ``Trainer``) -> report (detections,
scores, pictures -> metrics.json, manifest.json).

``model.pt`` stores its *artifact config*: the stage's ``artifact_keys`` (dataset, backbone, [miner,] detector,
schedule, seed, ``<section>``.boxes/labels/cluster_run/image_root/min_box_size) and the input's sha256. The
*report* keys (``REPORT_KEYS``) decide only detections.json, metrics.json's ``eval`` and viz/; ``force``,
``<section>.resume``/``stop_after`` and ``stage_dir`` are controls. A rerun with the same artifact and report
config is "up to date"; with only the report changed, the report is redone on model.pt; a partial model.pt of
this config continues with ``<section>.resume=true``; another artifact config over a model.pt is an error
naming the changed keys, and FORCE=1 trains beside the results and swaps them in when complete.

Multi-GPU: the stages run unchanged under ``torchrun --nproc_per_node=N -m stages.train_cag`` (make
NPROC=N): every process trains its share of the global batch (DDP); only rank 0 evaluates and writes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (ArtifactError, begin_replacement, commit_replacement, read_coco_boxes, read_json,
                                recover_replacement, replacement_dir, sha256_file, write_json, write_manifest)
from pipeline.data.box_file import training_set_records
from pipeline.detection.checkpoint import Checkpointer, DetectorSpec, load_detector, read_checkpoint
from pipeline.detection.data import DetectionDataset
from pipeline.detection.memory import check_train_memory
from pipeline.detection.schedule import Schedule
from pipeline.detection.settings import DetectorSettings
from pipeline.detection.solver import build_optimizer, build_scheduler
from pipeline.detection.trainer import Trainer, build_train_loader, create_ddp_model, init_distributed, prepare_model
from pipeline.evaluation.detections import ap_mode
from pipeline.provenance import coco_random_init, random_init
from pipeline.rerun import CheckpointRefused, plan_checkpoint, plan_rerun
from pipeline.status import annotations_digest
from stages.common import (Timer, build_dataset_from_cfg, coco_image_root, dataset_identity,
                           export_submitit_distributed_env, resolve_device, to_container, warn_random)
from stages.detector_common import detect_score_draw, format_eval

# what decides only the report made from a trained model (not its weights)
REPORT_KEYS = ("eval", "viz", "progress", "num_workers", "device")
# how to get past a refused checkpoint, in config keys (the library's message names the file and the settings)
_REFUSED_HINTS = {"changed": ". Restore that configuration, write elsewhere (stage_dir=...), or retrain over it "
                             "with FORCE=1 (force=true)",
                  "partial": "; {section}.resume=true continues it, FORCE=1 (force=true) starts over"}


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def artifact_config(cfg: DictConfig, keys: Sequence[str], in_path: Path) -> dict:
    """What decides the trained weights: the config entries ``keys`` (resolved; the dataset with its paths
    resolved, :func:`stages.common.dataset_identity`) and the input file's sha256. Stored in model.pt and
    compared on every rerun."""
    plain = {k: (dataset_identity(cfg) if k == "dataset" else _plain(OmegaConf.select(cfg, k))) for k in keys}
    return {**plain, "input_sha256": sha256_file(in_path)}


def report_config(cfg: DictConfig) -> dict:
    """What decides only the report made from the weights (detections, scores, pictures, speed)."""
    return {k: _plain(OmegaConf.select(cfg, k)) for k in REPORT_KEYS}


@dataclass
class Job:
    """What the plan decided, before any image is read: where the results go and what is done there
    (``mode``: ``skip`` = up to date, ``report`` = only the report on the finished model.pt, ``train``,
    ``resume``)."""
    cfg: DictConfig
    stage: str
    section: str
    in_path: Path
    stage_dir: Path
    out_dir: Path
    rank: int
    world: int
    schedule: Schedule
    coco: dict
    artifact: dict
    report: dict
    mode: str = "train"
    report_changes: tuple = ()
    device: str = "cpu"
    timer: Timer = field(default_factory=Timer)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "model.pt"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def run_training(cfg: DictConfig, *, stage: str, section: str, in_path: Path, what: str, hint: str,
                 class_agnostic: bool, artifact_keys: Sequence[str], producer: str = "") -> dict | None:
    """The whole train-cag / train-cad stage (see the module docstring). None on ranks > 0 and when the
    run stopped early (``<section>.stop_after``). ``producer`` says which step writes ``in_path`` (for the
    message when it changed: " (written by `make mine`)")."""
    job = plan(cfg, stage=stage, section=section, in_path=in_path, what=what, hint=hint,
               artifact_keys=artifact_keys, producer=producer)
    if job.mode == "skip":
        return read_json(job.stage_dir / "metrics.json") if job.rank == 0 else None
    dataset, eval_set = training_data(job, class_agnostic=class_agnostic, what=what, hint=hint)
    if job.mode == "report":
        if job.rank != 0:
            return None
        model, spec, trained = reuse_model(job)
    else:
        spec = DetectorSpec.create(DetectorSettings.from_dict(to_container(cfg.detector)), dataset.num_classes,
                                   seed=int(cfg.seed), category_ids=dataset.category_ids,
                                   category_names=dataset.category_names)
        model, trained = train_model(job, spec, dataset)
        if trained is None:
            return None
    return report(job, dataset, eval_set, model, spec, trained)


def plan(cfg: DictConfig, *, stage: str, section: str, in_path: Path, what: str, hint: str,
         artifact_keys: Sequence[str], producer: str) -> Job:
    """The rerun decision (up to date / report only / train / resume, or an error naming what changed), the
    replacement folder under FORCE, the device and whether it can hold the training."""
    timer = Timer()
    export_submitit_distributed_env()
    rank, world = init_distributed()
    stage_dir = Path(cfg.stage_dir)
    if rank == 0:
        recover_replacement(stage_dir)
    try:
        sch = Schedule.from_dict(to_container(cfg.schedule))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"schedule: {e}") from None
    coco = read_coco_boxes(in_path, what, hint)
    job = Job(cfg, stage, section, in_path, stage_dir, stage_dir, rank, world, sch, coco,
              artifact_config(cfg, artifact_keys, in_path), report_config(cfg), timer=timer)
    outputs = ("model.pt", "metrics.json") + (("detections.json",) if cfg.eval.enabled else ())
    inputs = {"input_sha256": f"the input {in_path}{producer}"}
    rerun = plan_rerun(stage_dir, stage=stage, artifact=job.artifact, report=job.report, outputs=outputs,
                       force=bool(cfg.force), inputs=inputs)
    job.report_changes = rerun.report_changes
    if rerun.action == "skip":
        if rank == 0:
            print(f"{stage}: {stage_dir} is up to date (same config and input, complete); FORCE=1 (force=true) "
                  "redoes it.", flush=True)
        job.mode = "skip"
        return job
    # FORCE trains beside the finished results and swaps them in when complete: a forced run that fails or
    # is killed leaves them whole (with resume=true the same command continues its checkpoint).
    if cfg.force:
        job.out_dir = replacement_dir(stage_dir)
        if rank == 0:
            begin_replacement(stage_dir, keep=bool(cfg[section].resume))
    job.barrier()
    job.mode = checkpoint_mode(job, inputs)
    job.device = _device(cfg, world)
    if job.mode != "report":  # before minutes of set-up and a silent kill by the kernel
        _check_memory(job)
    return job


def checkpoint_mode(job: Job, inputs: dict) -> str:
    """:func:`pipeline.rerun.plan_checkpoint` on ``model.pt``, its refusals with the config keys that get past
    them; under FORCE a checkpoint of another configuration (a killed forced run) is started over."""
    resume = bool(job.cfg[job.section].resume)
    try:
        ckpt = read_checkpoint(job.ckpt_path, "FORCE=1 (force=true) retrains it.", mmap=True) \
            if job.ckpt_path.is_file() else None
        try:
            return plan_checkpoint(job.ckpt_path, ckpt, job.artifact, resume=resume, inputs=inputs)
        except CheckpointRefused as e:
            raise CheckpointRefused(str(e) + _REFUSED_HINTS[e.kind].format(section=job.section), kind=e.kind) from None
        finally:
            del ckpt
    except ArtifactError:
        if not job.cfg.force:
            raise
    if job.rank == 0:  # a killed forced run of another configuration: FORCE starts over beside the results
        begin_replacement(job.stage_dir, keep=False)
    job.barrier()
    return "train"


def _device(cfg: DictConfig, world: int) -> str:
    device = resolve_device(str(cfg.device))
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _check_memory(job: Job) -> None:
    d = job.cfg.detector
    side = d.min_size if isinstance(d.min_size, (int, float)) else max(d.min_size)
    too_much = check_train_memory(str(d.preset), max(1, job.schedule.batch_size // job.world), int(side), job.device,
                                  rois_per_image=int(d.batch_size_per_image),
                                  amp=job.schedule.amp and job.device.startswith("cuda"))
    if too_much:
        raise ArtifactError(f"{too_much}: lower schedule.batch_size (and schedule.lr with it), the image sizes "
                            "(detector.min_size / detector.max_size), use more GPUs (make ... NPROC=N), or try the "
                            "code with detector=mobilenet_fpn schedule=smoke")


def training_data(job: Job, *, class_agnostic: bool, what: str, hint: str) -> tuple[DetectionDataset, tuple]:
    """The training set, and (records, missing, failed in mining) of the images the report runs the detector
    on (rank 0, when ``eval.enabled``)."""
    cfg, sec = job.cfg, job.cfg[job.section]
    root = coco_image_root(cfg, job.coco, override=sec.get("image_root"), fallback=job.in_path.parent)
    try:
        dataset = DetectionDataset(job.in_path, root, class_agnostic=class_agnostic,
                                   min_box_size=float(sec.min_box_size), what=what, hint=hint)
    except ValueError as e:  # empty file, nothing trainable: one clear line, exit 2
        raise ArtifactError(str(e)) from None
    if not (cfg.eval.enabled and job.rank == 0):
        return dataset, ([], 0, 0)
    return dataset, training_set_records(job.coco, root, build_dataset_from_cfg(cfg).records)


def reuse_model(job: Job) -> tuple:
    """The finished model.pt of this configuration (only the report is redone) and its training summary."""
    changes = "; ".join(job.report_changes) or "report outputs missing or incomplete"
    print(f"{job.stage}: {job.ckpt_path} is complete for this configuration; only the report changed "
          f"({changes}): re-running inference, evaluation and pictures on it "
          "(model.pt and metrics.jsonl are kept)", flush=True)
    model, spec, meta = load_detector(job.ckpt_path)
    return model, spec, _previous_training(job.out_dir, meta["iteration"])


def train_model(job: Job, spec: DetectorSpec, dataset: DetectionDataset) -> tuple:
    """model -> optimizer, LR schedule, loader, DDP -> the trainer (detectron2's ``do_train``); (model,
    training summary), the summary None on ranks > 0 and when the run stopped early."""
    cfg, sch, device = job.cfg, job.schedule, job.device
    model = spec.build_model()
    if spec.random_init and job.rank == 0:
        warn_random(f"detector {spec.preset}", "detector.init=random")
    provenance = {"stage": job.stage, "input": str(job.in_path), "input_sha256": job.artifact["input_sha256"],
                  "boxes_random_init": coco_random_init(job.coco)}
    checkpointer = Checkpointer(job.ckpt_path, spec=spec, schedule=sch.to_dict(), artifact_config=job.artifact,
                                provenance=provenance)
    loader = build_train_loader(dataset, sch.batch_size, seed=int(cfg.seed), num_workers=int(cfg.num_workers),
                                device=device)
    model = prepare_model(model, device)
    optimizer = build_optimizer(model, sch)
    trainer = Trainer(create_ddp_model(model, device), optimizer, build_scheduler(optimizer, sch), loader, sch,
                      out_dir=job.out_dir, device=device, progress=bool(cfg.progress),
                      stop_after=cfg[job.section].get("stop_after"), checkpointer=checkpointer)
    res = trainer.train(resume=job.mode == "resume")
    if job.rank != 0:
        return model, None
    if res.stopped_early:
        again = f"FORCE=1 with {job.section}.resume=true" if cfg.force else f"{job.section}.resume=true"
        print(f"{job.stage}: stopped after iteration {res.iteration} of {sch.iterations} ({job.section}.stop_after); "
              f"{again} continues from {job.ckpt_path}", flush=True)
        return model, None
    return model, {"iterations": res.iteration, "start_iteration": res.start_iteration,
                   "resumed": res.start_iteration > 0, "final_loss": res.losses[-1] if res.losses else None,
                   "train_seconds": round(job.timer.elapsed, 3)}


def _previous_training(stage_dir: Path, iteration: int) -> dict:
    """The training summary of the run that wrote model.pt (its metrics.json, else its metrics.jsonl)."""
    try:
        m = read_json(stage_dir / "metrics.json")
        if int(m.get("iterations", -1)) == iteration:
            return {"iterations": iteration, **{k: m.get(k) for k in ("start_iteration", "resumed", "final_loss",
                                                                       "train_seconds")}}
    except Exception:  # noqa: BLE001 - missing or unreadable: fall back to the training log
        pass
    final = None
    log = stage_dir / "metrics.jsonl"
    if log.is_file():
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        final = next((ln.get("loss") for ln in reversed(lines) if ln.get("iteration") == iteration), None)
    return {"iterations": iteration, "start_iteration": None, "resumed": None, "final_loss": final,
            "train_seconds": None}


def report(job: Job, dataset: DetectionDataset, eval_set: tuple, model, spec: DetectorSpec, trained: dict) -> dict:
    """Detections, scores and pictures of the model on the training images -> metrics.json, manifest.json; the
    replacement folder swapped in; the summary."""
    cfg, out_dir = job.cfg, job.out_dir
    metrics = {"stage": job.stage, "input": str(job.in_path), **trained, "model_reused": job.mode == "report",
               "num_classes": dataset.num_classes, "category_ids": dataset.category_ids,
               "dataset_stats": dict(dataset.stats), "missing_images": dataset.missing_images[:50],
               "detector": spec.preset, "detector_init": spec.init,
               "detector_random_init": spec.random_init, "boxes_random_init": coco_random_init(job.coco),
               "random_init": random_init(spec=spec, coco=job.coco)}
    eval_records, eval_missing, eval_failed = eval_set
    if cfg.eval.enabled:
        ev = detect_score_draw(model, eval_records, out_dir, category_ids=spec.category_ids,
                               mode=ap_mode(cfg.dataset.kind), voc_difficult=str(cfg.eval.voc_difficult),
                               device=job.device, batch_size=int(cfg.eval.batch_size), progress=bool(cfg.progress),
                               viz_images=int(cfg.viz.num_images), viz_min_score=float(cfg.viz.min_score),
                               random_init=metrics["random_init"])
        metrics["eval"] = {**ev, "images_missing": eval_missing, "images_failed_in_mining": eval_failed}
    write_json(out_dir / "metrics.json", metrics)
    write_manifest(out_dir, stage=job.stage, config=to_container(cfg), inputs={section_input(job.section): job.in_path},
                   weights_sha256=spec.weights_sha256, start_time=job.timer.start, end_time=time.time(),
                   extra={"artifact": job.artifact, "report": job.report, "iteration": metrics["iterations"],
                          "random_init": metrics["random_init"], "model_reused": job.mode == "report",
                          "annotations_digest": annotations_digest(eval_records) if eval_records else None})
    if out_dir != job.stage_dir:
        commit_replacement(job.stage_dir, out_dir)
    print_summary(job.stage, job.stage_dir, metrics)
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
