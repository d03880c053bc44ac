"""What the training stages (train-cag, train-cad, self-train) share: :func:`run_training` reads the config into
:class:`pipeline.detection.run.TrainParams` (:func:`train_params`), runs :func:`pipeline.detection.run.train_detector`
(plan -> data -> model -> train -> report; self-train: its rounds) and says its refusals in config keys.

``model.pt`` stores the *artifact config*: the stage's ``artifact_keys`` (dataset, backbone, [miner,] detector,
schedule, seed, ``<section>``.boxes/labels/cluster_run/image_root/min_box_size) and the input's sha256. The
*report* keys (``REPORT_KEYS``) decide only detections.json, metrics.json's ``eval`` and viz/; ``force``,
``<section>.resume``/``stop_after`` and ``stage_dir`` are controls. Multi-GPU: the stages run unchanged under
``torchrun --nproc_per_node=N -m stages.train_cag`` (make NPROC=N); only rank 0 evaluates and writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.detection.data import MasksMissing
from pipeline.detection.recipe import TrainRecipe
from pipeline.detection.run import DeviceTooSmall, Hints, TrainParams, train_detector
from pipeline.detection.schedule import Schedule
from pipeline.detection.settings import DetectorSettings
from pipeline.discovery import Miner
from pipeline.evaluation.detections import ap_mode
from pipeline.rerun import CheckpointRefused
from stages.common import StageError, build_dataset_from_cfg, coco_image_root, dataset_identity, to_container

# what decides only the report made from a trained model (not its weights)
REPORT_KEYS = ("eval", "viz", "progress", "num_workers", "device")
# how to get past a refusal, in config keys (the library's message names the file, the settings, the device)
_REFUSED_HINTS = {"changed": ". Restore that configuration, write elsewhere (stage_dir=...), or retrain over it "
                             "with FORCE=1 (force=true)",
                  "partial": "; {section}.resume=true continues it, FORCE=1 (force=true) starts over"}
_MEMORY_HINT = (": lower schedule.batch_size (and schedule.lr with it), the image sizes (detector.min_size / "
                "detector.max_size), use more GPUs (make ... NPROC=N), or try the code with detector=mobilenet_fpn "
                "schedule=smoke")


def _recorded(cfg: DictConfig, key: str):
    """The value of ``key`` as the artifact records it (the dataset's identity; the miner's recorded parameters)."""
    v = OmegaConf.select(cfg, key)
    v = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return dataset_identity(cfg) if key == "dataset" else Miner.recorded(v) if key == "miner" else v


def train_params(cfg: DictConfig, *, section: str, in_path: Path, input_name: str, what: str, hint: str,
                 producer: str, class_agnostic: bool, artifact_keys: Sequence[str], says: str) -> TrainParams:
    """The train-cag / train-cad job of section ``section`` on ``in_path`` (the manifest's ``input_name``;
    ``producer``: " (written by `make mine`)" when a stage wrote it; ``says``: the section its hints name)."""
    sec, force = cfg[section], bool(cfg.force)
    recipe = TrainRecipe.of(to_container(sec))  # recorded in model.pt only where it is not LOST's recipe
    return TrainParams(  # every section it reads was checked by stages.checks before the stage ran
        stage=section, stage_dir=Path(cfg.stage_dir), in_path=in_path, input_name=input_name,
        class_agnostic=class_agnostic, settings=DetectorSettings.from_dict(to_container(cfg.detector)),
        schedule=Schedule.from_dict(to_container(cfg.schedule)), config=to_container(cfg),
        artifact={**{k: _recorded(cfg, k) for k in artifact_keys}, **({"recipe": r} if (r := recipe.recorded()) else {})},
        recipe=recipe,
        report={k: _recorded(cfg, k) for k in REPORT_KEYS},
        image_root=lambda coco: coco_image_root(cfg, coco, override=sec.get("image_root"), fallback=in_path.parent),
        dataset_records=lambda: build_dataset_from_cfg(cfg).records, what=what, hint=hint, producer=producer,
        seed=int(cfg.seed), min_box_size=float(sec.min_box_size), device=str(cfg.device),
        num_workers=int(cfg.num_workers), progress=bool(cfg.progress), force=force, resume=bool(sec.resume),
        stop_after=sec.get("stop_after"), ap_mode=ap_mode(cfg.dataset.kind), evaluation=OmegaConf.to_object(cfg.eval),
        viz=OmegaConf.to_object(cfg.viz),
        hints=Hints(redo="FORCE=1 (force=true) redoes it", retrain="FORCE=1 (force=true) retrains it.",
                    resume=f"FORCE=1 with {says}.resume=true" if force else f"{says}.resume=true",
                    stop_after=f"{says}.stop_after", random_init="detector.init=random",
                    prerequisite="run `make train-cag` with the same ARGS first"))


def run_training(cfg: DictConfig, *, section: str, job=train_detector, says: str = "", **kw) -> dict | list | None:
    """``job`` (:func:`train_detector`) on :func:`train_params`, its refusals said in config keys (``says``, default
    ``section``). None on ranks > 0 and when the run stopped early."""
    try:
        return job(train_params(cfg, section=section, says=says or section, **kw))
    except CheckpointRefused as e:
        raise CheckpointRefused(str(e) + _REFUSED_HINTS[e.kind].format(section=says or section), kind=e.kind) from None
    except DeviceTooSmall as e:
        raise DeviceTooSmall(f"{e}{_MEMORY_HINT}") from None
    except MasksMissing as e:
        given = f"{section}.{'boxes' if section == 'train_cag' else 'labels'}"
        raise StageError(f"detector={cfg.detector.name}: {e}: mine again (make mine FORCE=1, any miner), give a file "
                         f"with masks ({given}=...), or train boxes only (detector=r50_fpn, mobilenet_fpn)") from None


# What decides train-cag's weights (stored in model.pt, compared on reruns); eval/viz/progress/num_workers/device
# decide only the report (REPORT_KEYS).
CAG_ARTIFACT_KEYS = ("dataset", "backbone", "miner", "detector", "schedule", "seed", "train_cag.boxes",
                     "train_cag.image_root", "train_cag.min_box_size")


def train_cag(cfg: DictConfig, **job) -> dict | list | None:
    """train-cag's training (``job``, ``says``: another job on its parameters, self-train's rounds)."""
    c = cfg.train_cag
    path = Path(str(c.boxes)) if c.get("boxes") else Path(str(cfg.inputs.pseudo_boxes))
    return run_training(cfg, section="train_cag", **job, in_path=path, input_name="pseudo_boxes",
                        what="pseudo-box file", hint="Run `make mine` (python -m stages.mine) with the same "
                        "dataset/backbone first, or set train_cag.boxes=<COCO json>.",
                        producer="" if c.get("boxes") else " (written by `make mine`)", class_agnostic=True,
                        artifact_keys=CAG_ARTIFACT_KEYS)
