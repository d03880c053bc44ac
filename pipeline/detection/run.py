"""The training job of train-cag / train-cad, :func:`train_detector`, which reads top to bottom as
detectron2's ``do_train``: plan (:func:`pipeline.rerun.plan_rerun` on the finished results,
:func:`pipeline.rerun.plan_checkpoint` on model.pt, device memory) -> data (the COCO training set, the records
the report runs on) -> model (a ``DetectorSpec`` of the given ``DetectorSettings``) -> train (model on its
device, ``build_optimizer``, ``build_scheduler``, the loader, DDP, the ``Trainer``) -> report (detections,
scores, pictures -> metrics.json, manifest.json).

Plain parameters (:class:`TrainParams`). ``model.pt`` stores the ``artifact`` settings and the input's sha256: a
rerun with the same artifact and report settings is "up to date"; with only the report changed, the report is
redone on model.pt; a partial model.pt of these settings continues with ``resume``; other artifact settings over
a model.pt are a :class:`~pipeline.rerun.CheckpointRefused` naming the changes, and ``force`` trains beside the
results and swaps them in when complete. Under torchrun every process trains its share of the global batch
(DDP); only rank 0 evaluates and writes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch.distributed as dist

from pipeline.artifacts import (ArtifactError, begin_replacement, commit_replacement, read_coco_boxes, read_json,
                                recover_replacement, replacement_dir, sha256_file, write_json, write_manifest)
from pipeline.data.box_file import training_set_records
from pipeline.detection.checkpoint import Checkpointer, DetectorSpec, init_weights, load_detector, read_checkpoint
from pipeline.detection.data import DetectionDataset
from pipeline.detection.memory import check_train_memory
from pipeline.detection.recipe import TrainRecipe
from pipeline.detection.report import detect_score_draw, format_eval, job_device
from pipeline.detection.schedule import Schedule
from pipeline.detection.settings import DetectorSettings
from pipeline.detection.solver import build_optimizer, build_scheduler
from pipeline.detection.trainer import Trainer, build_train_loader, create_ddp_model, init_distributed, prepare_model
from pipeline.evaluation.settings import EvalSettings
from pipeline.provenance import coco_random_init, random_init
from pipeline.rerun import CheckpointRefused, plan_checkpoint, plan_rerun
from pipeline.runtime import Timer, export_submitit_distributed_env, warn_random
from pipeline.status import annotations_digest
from pipeline.viz.settings import VizSettings


class DeviceTooSmall(ArtifactError):
    """The training would not fit in the device's free memory (the caller adds what to change)."""


@dataclass(frozen=True)
class Hints:
    """How the caller's user does what a printed message suggests (the train stages: config keys)."""
    redo: str = "force=True redoes it"        # results up to date
    retrain: str = "force=True retrains it."  # model.pt unreadable
    resume: str = "resume=True"               # continues a stopped run
    stop_after: str = "stop_after"            # the setting that stopped it
    random_init: str = "init=random"          # why the detector's weights are random
    prerequisite: str = "train it first"      # self-training: how the detector the rounds start from is made


@dataclass
class TrainParams:
    """What :func:`train_detector` needs. ``artifact``: the settings that decide the weights (the input's sha256
    is added); ``report``: those that decide only the report; ``config``: what the manifest records;
    ``input_name``: the input's name there; ``what``/``hint``/``producer``: the input in messages (what it is,
    how to make it, " (written by ...)"); ``image_root(coco)``: where the box file's images are;
    ``dataset_records()``: the records whose ground truth the report scores against (``ap_mode`` AP style);
    ``evaluation.enabled`` False: no detection pass; ``device``: a name for :func:`pipeline.runtime.resolve_device`."""
    stage: str
    stage_dir: Path
    in_path: Path
    input_name: str
    class_agnostic: bool
    settings: DetectorSettings
    schedule: Schedule
    artifact: dict
    report: dict
    config: dict
    image_root: Callable[[dict], Path]
    dataset_records: Callable[[], Sequence]
    what: str = "pseudo-box file"
    hint: str = ""
    producer: str = ""
    seed: int = 0
    min_box_size: float = 1.0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = False
    force: bool = False
    resume: bool = False
    stop_after: int | None = None
    ap_mode: str = "voc"
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    init_from: Path | None = None  # start from this detector checkpoint's weights (a self-training round)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    viz: VizSettings = field(default_factory=VizSettings)
    hints: Hints = field(default_factory=Hints)


@dataclass
class Job:
    """What the plan decided, before any image is read: where the results go and what is done there
    (``mode``: ``skip`` = up to date, ``report`` = only the report on the finished model.pt, ``train``,
    ``resume``)."""
    p: TrainParams
    out_dir: Path
    rank: int
    world: int
    coco: dict
    artifact: dict
    timer: Timer
    mode: str = "train"
    report_changes: tuple = ()
    device: str = "cpu"

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "model.pt"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def train_detector(p: TrainParams) -> dict | None:
    """The whole training job (see the module docstring): its metrics, None on ranks > 0 and when the run
    stopped early (``stop_after``)."""
    job = plan(p)
    if job.mode == "skip":
        return read_json(p.stage_dir / "metrics.json") if job.rank == 0 else None
    dataset, eval_set = training_data(job)
    if job.mode == "report":
        if job.rank != 0:
            return None
        model, spec, trained = reuse_model(job)
    else:
        spec = DetectorSpec.create(p.settings, dataset.num_classes, seed=p.seed, category_ids=dataset.category_ids,
                                   category_names=dataset.category_names)
        model, trained = train_model(job, spec, dataset)
        if trained is None:
            return None
    return report(job, dataset, eval_set, model, spec, trained)


def plan(p: TrainParams) -> Job:
    """The rerun decision (up to date / report only / train / resume, or an error naming what changed), the
    replacement folder under ``force``, the device and whether it can hold the training."""
    timer = Timer()
    export_submitit_distributed_env()
    rank, world = init_distributed()
    if rank == 0:
        recover_replacement(p.stage_dir)
    if p.recipe.copy_paste > 0 and not p.settings.masks:
        raise ArtifactError(f"copy_paste={p.recipe.copy_paste} pastes objects with their masks: it needs a mask "
                            f"detector preset, not {p.settings.preset} (or copy_paste=0)")
    coco = read_coco_boxes(p.in_path, p.what, p.hint)
    artifact = {**p.artifact, "input_sha256": sha256_file(p.in_path)}
    if p.init_from is not None:  # the weights it starts from decide its weights
        artifact["init_sha256"] = sha256_file(p.init_from)
    job = Job(p, p.stage_dir, rank, world, coco, artifact, timer)
    outputs = ("model.pt", "metrics.json") + (("detections.json",) if p.evaluation.enabled else ())
    inputs = {"input_sha256": f"the input {p.in_path}{p.producer}"}
    rerun = plan_rerun(p.stage_dir, stage=p.stage, artifact=job.artifact, report=p.report, outputs=outputs,
                       force=p.force, inputs=inputs)
    job.report_changes = rerun.report_changes
    if rerun.action == "skip":
        if rank == 0:
            print(f"{p.stage}: {p.stage_dir} is up to date (same config and input, complete); {p.hints.redo}.",
                  flush=True)
        job.mode = "skip"
        return job
    # force trains beside the finished results and swaps them in when complete: a forced run that fails or is
    # killed leaves them whole (with resume the same command continues its checkpoint).
    if p.force:
        job.out_dir = replacement_dir(p.stage_dir)
        if rank == 0:
            begin_replacement(p.stage_dir, keep=p.resume)
    job.barrier()
    job.mode = checkpoint_mode(job, inputs)
    job.device = job_device(p.device, world)
    if job.mode != "report":  # before minutes of set-up and a silent kill by the kernel
        check_memory(job)
    return job


def checkpoint_mode(job: Job, inputs: dict) -> str:
    """:func:`pipeline.rerun.plan_checkpoint` on ``model.pt`` (its refusals are the caller's to explain); under
    ``force`` a checkpoint of another configuration (a killed forced run) is started over."""
    p = job.p
    try:
        ckpt = read_checkpoint(job.ckpt_path, p.hints.retrain, mmap=True) if job.ckpt_path.is_file() else None
        try:
            return plan_checkpoint(job.ckpt_path, ckpt, job.artifact, resume=p.resume, inputs=inputs)
        finally:
            del ckpt
    except ArtifactError:  # CheckpointRefused included
        if not p.force:
            raise
    if job.rank == 0:  # a killed forced run of another configuration: force starts over beside the results
        begin_replacement(p.stage_dir, keep=False)
    job.barrier()
    return "train"


def check_memory(job: Job) -> None:
    """A :class:`DeviceTooSmall` when the device obviously cannot hold this process's share of the training."""
    s, sch = job.p.settings, job.p.schedule
    side = s.min_size if isinstance(s.min_size, (int, float)) else max(s.min_size)
    too_much = check_train_memory(str(s.preset), max(1, sch.batch_size // job.world), int(side), job.device,
                                  rois_per_image=int(s.batch_size_per_image),
                                  amp=sch.amp and job.device.startswith("cuda"))
    if too_much:
        raise DeviceTooSmall(too_much)


def training_data(job: Job) -> tuple[DetectionDataset, tuple]:
    """The training set, and (records, missing, failed in mining) of the images the report runs the detector
    on (rank 0, when ``evaluation.enabled``)."""
    p = job.p
    root = p.image_root(job.coco)
    try:
        dataset = DetectionDataset(p.in_path, root, class_agnostic=p.class_agnostic, min_box_size=p.min_box_size,
                                   what=p.what, hint=p.hint, masks=p.settings.masks)
    except ValueError as e:  # empty file, nothing trainable: one clear line, exit 2
        raise ArtifactError(str(e)) from None
    if not (p.evaluation.enabled and job.rank == 0):
        return dataset, ([], 0, 0)
    return dataset, training_set_records(job.coco, root, p.dataset_records())


def reuse_model(job: Job) -> tuple:
    """The finished model.pt of this configuration (only the report is redone) and its training summary."""
    changes = "; ".join(job.report_changes) or "report outputs missing or incomplete"
    print(f"{job.p.stage}: {job.ckpt_path} is complete for this configuration; only the report changed "
          f"({changes}): re-running inference, evaluation and pictures on it "
          "(model.pt and metrics.jsonl are kept)", flush=True)
    model, spec, meta = load_detector(job.ckpt_path)
    return model, spec, previous_training(job.out_dir, meta["iteration"])


def train_model(job: Job, spec: DetectorSpec, dataset: DetectionDataset) -> tuple:
    """model -> optimizer, LR schedule, loader, DDP -> the trainer (detectron2's ``do_train``); (model,
    training summary), the summary None on ranks > 0 and when the run stopped early."""
    p, sch, device = job.p, job.p.schedule, job.device
    model = spec.build_model()
    if spec.random_init and job.rank == 0:
        warn_random(f"detector {spec.preset}", p.hints.random_init)
    if p.init_from is not None:
        init_weights(model, p.init_from)
    model, dataset = with_recipe(p.recipe, model, dataset, seed=p.seed)
    provenance = {"stage": p.stage, "input": str(p.in_path), "input_sha256": job.artifact["input_sha256"],
                  "boxes_random_init": coco_random_init(job.coco)}
    checkpointer = Checkpointer(job.ckpt_path, spec=spec, schedule=sch.to_dict(), artifact_config=job.artifact,
                                provenance=provenance)
    loader = build_train_loader(dataset, sch.batch_size, seed=p.seed, num_workers=p.num_workers, device=device)
    model = prepare_model(model, device)
    optimizer = build_optimizer(model, sch)
    trainer = Trainer(create_ddp_model(model, device), optimizer, build_scheduler(optimizer, sch), loader, sch,
                      out_dir=job.out_dir, device=device, progress=p.progress, stop_after=p.stop_after,
                      checkpointer=checkpointer)
    res = trainer.train(resume=job.mode == "resume")
    if job.rank != 0:
        return model, None
    if res.stopped_early:
        print(f"{p.stage}: stopped after iteration {res.iteration} of {sch.iterations} ({p.hints.stop_after}); "
              f"{p.hints.resume} continues from {job.ckpt_path}", flush=True)
        return model, None
    return model, {"iterations": res.iteration, "start_iteration": res.start_iteration,
                   "resumed": res.start_iteration > 0, "final_loss": res.losses[-1] if res.losses else None,
                   "train_seconds": round(job.timer.elapsed, 3),
                   **({"init_from": str(p.init_from)} if p.init_from is not None else {})}


def with_recipe(recipe: TrainRecipe, model, dataset: DetectionDataset, *, seed: int) -> tuple:
    """The model and training set as ``recipe`` asks: DropLoss in the box head (``drop_loss_iou``), copy-paste
    on the samples (``copy_paste``, which needs the masks of a mask detector's training set), the pseudo-boxes'
    scores as weights of their losses (``score_weighting``, before DropLoss, which then sets its threshold)."""
    if recipe.score_weighting:
        from pipeline.detection.score_weighting import with_score_weighting

        model = with_score_weighting(model)
    if recipe.drop_loss_iou > 0:
        from pipeline.detection.droploss import with_drop_loss

        model = with_drop_loss(model, recipe.drop_loss_iou)
    if recipe.copy_paste > 0:
        from pipeline.detection.copy_paste import CopyPasteDataset

        dataset = CopyPasteDataset(dataset, recipe.copy_paste, tuple(recipe.copy_paste_scale), seed=seed)
    return model, dataset


def previous_training(stage_dir: Path, iteration: int) -> dict:
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
    p, out_dir = job.p, job.out_dir
    metrics = {"stage": p.stage, "input": str(p.in_path), **trained, "model_reused": job.mode == "report",
               "num_classes": dataset.num_classes, "category_ids": dataset.category_ids,
               "dataset_stats": dict(dataset.stats), "missing_images": dataset.missing_images[:50],
               "detector": spec.preset, "detector_init": spec.init,
               "detector_random_init": spec.random_init, "boxes_random_init": coco_random_init(job.coco),
               "random_init": random_init(spec=spec, coco=job.coco)}
    eval_records, eval_missing, eval_failed = eval_set
    if p.evaluation.enabled:
        ev = detect_score_draw(model, eval_records, out_dir, category_ids=spec.category_ids, mode=p.ap_mode,
                               evaluation=p.evaluation, viz=p.viz, device=job.device, progress=p.progress,
                               random_init=metrics["random_init"])
        metrics["eval"] = {**ev, "images_missing": eval_missing, "images_failed_in_mining": eval_failed}
    write_json(out_dir / "metrics.json", metrics)
    inputs = {p.input_name: p.in_path, **({"init_weights": p.init_from} if p.init_from is not None else {})}
    write_manifest(out_dir, stage=p.stage, config=p.config, inputs=inputs,
                   weights_sha256=spec.weights_sha256, start_time=job.timer.start, end_time=time.time(),
                   extra={"artifact": job.artifact, "report": p.report, "iteration": metrics["iterations"],
                          "random_init": metrics["random_init"], "model_reused": job.mode == "report",
                          "annotations_digest": annotations_digest(eval_records) if eval_records else None})
    if out_dir != p.stage_dir:
        commit_replacement(p.stage_dir, out_dir)
    print(format_summary(p.stage, p.stage_dir, metrics), flush=True)
    return metrics


def format_summary(stage: str, stage_dir: Path, m: dict) -> str:
    """The console summary of a training run's metrics (what was trained on, dropped, scored and written)."""
    s = m["dataset_stats"]
    how = "model.pt reused, not retrained" if m.get("model_reused") else \
        ("resumed at " + str(m["start_iteration"]) if m["resumed"] else
         f"from the weights of {m['init_from']}" if m.get("init_from") else "from scratch")
    lines = [f"{stage}: {m['iterations']} iterations ({how}), "
             f"{m['num_classes']} class(es), final loss {m['final_loss'] if m['final_loss'] is None else round(m['final_loss'], 4)}",
             f"training set: {s['images_used']} images, {s['boxes_used']} boxes used; dropped: "
             f"{s['images_missing']} missing images, {s['images_size_mismatch']} size mismatches, "
             f"{s['images_without_boxes']} images without boxes, {s['boxes_degenerate']} degenerate boxes, "
             f"{s['boxes_unknown_category']} boxes of unknown category ({s['boxes_clipped']} clipped)"]
    for path in m["missing_images"][:5]:
        lines.append(f"  missing: {path}")
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
    return "\n".join(lines)
