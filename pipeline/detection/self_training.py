"""Self-training (CutLER, Wang et al. CVPR 2023, Sec. 3.3): the pseudo-labels of round r+1 from the detector of
round r. Implemented from the paper; CutLER's code (CC BY-NC-SA) is not used.

:func:`merge_round`: the detector's predictions on the training images scoring at least the round's threshold
are kept (at most ``max_per_image``, best first), and every previous pseudo-object whose IoU with all kept
predictions of its image is below ``iou_threshold`` (0.5) is added back, so objects the detector missed are not
forgotten. IoU is of masks when both sides have them (compressed RLE), else of boxes.

:func:`next_round` writes a round's pseudo-label file from the previous round's detector; :func:`self_train` runs
the rounds (:class:`SelfTrainSettings`): round r in ``<cag dir>/round<r>/`` (pseudo_labels.json, then the training
job :func:`pipeline.detection.run.train_detector` from round r-1's weights, DropLoss off, as CutLER), each with the
rerun rules of a training (up to date, resume, a refusal naming what changed). :func:`pipeline.summaries.rounds_table` reads them back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from pipeline.boxes import iou_matrix, xywh_to_xyxy
from pipeline.settings import Settings
from pipeline.summaries import format_rounds, rounds_table



@dataclass
class SelfTrainSettings(Settings):
    """Self-training rounds on top of a trained class-agnostic detector (CutLER Sec. 3.3)."""
    rounds: int = 1                 # rounds after train-cag's detector (round 0); CutLER: up to 3
    # round r keeps the predictions scoring >= score_thresholds[r-1] (the last one for later rounds); CutLER: 0.7, 0.65
    score_thresholds: List[float] = field(default_factory=lambda: [0.7, 0.65])
    iou_threshold: float = 0.5      # a previous pseudo-object overlapping a kept prediction this much is replaced
    max_per_image: int = 100        # predictions kept per image at most (best first)
    # a round's training: train-cag's schedule and recipe (DropLoss off), with these where given (CutLER's rounds:
    # 80k iterations at LR 0.005 without decay, copy-paste scale [0.5, 1.0])
    iterations: Optional[int] = None
    lr: Optional[float] = None
    steps: Optional[List[int]] = None
    copy_paste_scale: Optional[List[float]] = None
    resume: bool = False            # continue a round whose training was stopped (as train_cag.resume)
    stop_after: Optional[int] = None  # stop a round's training after this many iterations, as if killed (tests)

    def rules(self) -> list[tuple[str, bool, str]]:
        return [("rounds", isinstance(self.rounds, int) and self.rounds >= 1, "must be an integer >= 1"),
                ("score_thresholds", len(self.score_thresholds) >= 1 and all(0 <= t <= 1 for t in self.score_thresholds),
                 "must be a non-empty list of scores in [0, 1] (round r uses the r-th, the last for later rounds)"),
                ("iou_threshold", 0 < self.iou_threshold <= 1, "must be in (0, 1]"),
                ("max_per_image", isinstance(self.max_per_image, int) and self.max_per_image >= 1,
                 "must be an integer >= 1"),
                ("iterations", self.iterations is None or self.iterations >= 1, "must be null or >= 1"),
                ("lr", self.lr is None or self.lr > 0, "must be null or > 0"),
                ("copy_paste_scale", self.copy_paste_scale is None or (
                    len(self.copy_paste_scale) == 2 and 0 < self.copy_paste_scale[0] <= self.copy_paste_scale[1]),
                 "must be null or [low, high] with 0 < low <= high")]

    def schedule(self, base):
        """A round's :class:`~pipeline.detection.schedule.Schedule`: ``base`` (train-cag's) with the given fields."""
        given = {k: getattr(self, k) for k in ("iterations", "lr", "steps") if getattr(self, k) is not None}
        return dataclasses.replace(base, **given) if given else base

    def recipe(self, base):
        """A round's :class:`~pipeline.detection.recipe.TrainRecipe`: ``base`` without DropLoss (CutLER's rounds),
        with ``copy_paste_scale`` where given."""
        scale = {"copy_paste_scale": list(self.copy_paste_scale)} if self.copy_paste_scale is not None else {}
        return dataclasses.replace(base, drop_loss_iou=0.0, **scale)

    def threshold(self, r: int) -> float:
        """The score threshold of round ``r`` (1-based)."""
        return float(self.score_thresholds[min(r, len(self.score_thresholds)) - 1])


def _ious(kept: Sequence[dict], previous: Sequence[dict]) -> np.ndarray:
    """(len(previous), len(kept)) IoU: of masks when every object has one, else of boxes (COCO ``bbox`` xywh)."""
    if not kept or not previous:
        return np.zeros((len(previous), len(kept)))
    if all("segmentation" in a for a in (*kept, *previous)):
        from pycocotools import mask as mask_utils

        from pipeline.masks import _as_pycoco

        return np.asarray(mask_utils.iou([_as_pycoco(a["segmentation"]) for a in previous],
                                         [_as_pycoco(a["segmentation"]) for a in kept], [0] * len(kept)))
    return iou_matrix(xywh_to_xyxy([a["bbox"] for a in previous]), xywh_to_xyxy([a["bbox"] for a in kept]))


def merge_round(predictions: Sequence[dict], previous: Sequence[dict], *, score_threshold: float,
                iou_threshold: float = 0.5, max_per_image: int | None = None) -> list[dict]:
    """The next round's pseudo-objects (COCO annotations without ids, ``source`` = "prediction" or "previous").

    ``predictions``: COCO results of the round's detector (``image_id``, ``bbox`` xywh, ``score``, optionally
    ``segmentation``); ``previous``: the round's pseudo-objects (COCO annotations, ``bbox``, optionally
    ``segmentation`` and ``score``). Per image: predictions with ``score >= score_threshold``, best first, at most
    ``max_per_image``; then the previous objects whose IoU with every kept prediction is ``< iou_threshold``.
    Ties in score keep the predictions' order."""
    by_image: dict[int, tuple[list, list]] = {}
    for p in predictions:
        by_image.setdefault(int(p["image_id"]), ([], []))[0].append(p)
    for a in previous:
        by_image.setdefault(int(a["image_id"]), ([], []))[1].append(a)
    out: list[dict] = []
    for image_id in sorted(by_image):
        preds, prev = by_image[image_id]
        kept = sorted((p for p in preds if float(p["score"]) >= score_threshold), key=lambda p: -float(p["score"]))
        kept = kept[:max_per_image] if max_per_image is not None else kept
        ious = _ious(kept, prev)
        back = [a for a, row in zip(prev, ious) if not (row >= iou_threshold).any()]
        for p in kept:
            out.append({**{k: v for k, v in p.items() if k != "id"}, "category_id": 1, "source": "prediction"})
        for a in back:
            out.append({**{k: v for k, v in a.items() if k != "id"}, "source": "previous"})
    return out


def next_round(model, previous: dict, root, *, score_threshold: float, iou_threshold: float = 0.5,
               max_per_image: int | None = 100, device: str = "cpu", batch_size: int = 2,
               progress: bool = False) -> dict:
    """The next round's pseudo-label file (a COCO dataset like ``pseudo_boxes.json``): ``model`` (the round's
    detector) predicts on the images of ``previous`` (its pseudo-label file, ``file_name`` under ``root``), and
    :func:`merge_round` keeps its confident predictions and adds back the objects they miss. Images mining failed
    on or missing on disk keep their previous objects; ``info.self_training`` says how many came from where."""
    from pipeline.artifacts import coco_boxes_dataset
    from pipeline.boxes import xywh_to_xyxy
    from pipeline.data.box_file import training_set_records
    from pipeline.detection.inference import predict, to_coco_results
    from pipeline.masks import rle_area

    records, _, _ = training_set_records(previous, root)
    results = to_coco_results(predict(model, records, device=device, batch_size=batch_size, progress=progress))
    merged = merge_round(results, previous["annotations"], score_threshold=score_threshold,
                         iou_threshold=iou_threshold, max_per_image=max_per_image)
    anns = []
    for a in merged:
        ann = {k: v for k, v in a.items() if k != "bbox"}
        ann["bbox_xyxy"] = xywh_to_xyxy([a["bbox"]])[0].tolist()
        if isinstance(a.get("segmentation"), dict):  # a mask's area is its pixels (a prediction has none yet)
            ann["area"] = float(rle_area(a["segmentation"]))
        anns.append(ann)
    counts = {s: sum(a["source"] == s for a in merged) for s in ("prediction", "previous")}
    info = {**previous.get("info", {}), "self_training": {"score_threshold": score_threshold,
                                                          "iou_threshold": iou_threshold, **counts}}
    return coco_boxes_dataset(previous["images"], anns, categories=previous.get("categories"), info=info)


def _made_from(r: int, s: SelfTrainSettings, model: Path, labels: Path) -> dict:
    """What decides round ``r``'s pseudo-label file (recorded in it as ``info.self_training.made_from``)."""
    from pipeline.artifacts import sha256_file

    return {"round": r, "score_threshold": s.threshold(r), "iou_threshold": float(s.iou_threshold),
            "max_per_image": int(s.max_per_image), "model_sha256": sha256_file(model),
            "labels_sha256": sha256_file(labels)}


def _labels_made_from(path: Path) -> dict | None:
    from pipeline.artifacts import read_json

    try:
        return ((read_json(path).get("info") or {}).get("self_training") or {}).get("made_from")
    except Exception:  # noqa: BLE001 - unreadable: made again
        return None


def round_labels(r: int, folder: Path, model: Path, labels: Path, s: SelfTrainSettings, *, image_root,
                 device: str, batch_size: int, progress: bool, forced: bool) -> Path:
    """``folder``/pseudo_labels.json of round ``r`` from the previous round's detector ``model`` and pseudo-labels
    ``labels``: kept when it was made from the same (settings, model and labels), made otherwise. A file made from
    something else under a trained round is a :class:`~pipeline.rerun.RerunRefused` naming the changes (``forced``:
    the folder is a forced rerun's own, made again)."""
    from pipeline.artifacts import read_coco_boxes, write_json
    from pipeline.detection.checkpoint import load_detector
    from pipeline.diff import diff_values, format_changes
    from pipeline.rerun import RerunRefused

    path, made_from = folder / "pseudo_labels.json", _made_from(r, s, model, labels)
    old = _labels_made_from(path) if path.is_file() else None
    if old == made_from:
        return path
    if old is not None and not forced and any((folder / f).exists() for f in ("model.pt", "manifest.json")):
        changes = format_changes(diff_values(old, made_from))
        raise RerunRefused(f"round {r} ({folder}) was trained on pseudo-labels made otherwise ({changes}): redoing it "
                           "would replace a finished round; force the rerun to redo the rounds")
    previous = read_coco_boxes(labels, f"round {r - 1}'s pseudo-labels")
    detector, _, _ = load_detector(model)
    coco = next_round(detector, previous, image_root(previous), score_threshold=s.threshold(r),
                      iou_threshold=s.iou_threshold, max_per_image=s.max_per_image, device=device,
                      batch_size=batch_size, progress=progress)
    coco["info"]["self_training"]["made_from"] = made_from
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, coco)
    st = coco["info"]["self_training"]
    print(f"self-train round {r}: {path}: {st['prediction']} predictions (score >= {s.threshold(r)}) + "
          f"{st['previous']} previous pseudo-objects they miss (IoU < {s.iou_threshold})", flush=True)
    return path


def self_train(base, s: SelfTrainSettings) -> list[dict] | None:
    """Rounds 1..``s.rounds`` on the finished train-cag job ``base`` (a :class:`pipeline.detection.run.TrainParams`
    of the cag folder: its settings, schedule, report): round r's pseudo-labels (:func:`round_labels`) from round
    r-1's detector (round 0: ``base.stage_dir``/model.pt and its input), then a training from its weights with
    DropLoss off, in ``base.stage_dir``/round<r>/. ``base.force`` redoes every round, each beside its finished
    results until it is complete. The rounds' table (:func:`rounds_table`), None when a round stopped early (or on
    ranks > 0)."""
    from pipeline.artifacts import (ArtifactError, begin_replacement, commit_replacement, read_json, recover_replacement,
                                    sha256_file)
    from pipeline.detection.report import job_device
    from pipeline.detection.run import train_detector

    s.check()
    device = job_device(base.device)
    cag, model = base.stage_dir, base.stage_dir / "model.pt"
    if not (model.is_file() and (cag / "manifest.json").is_file()):
        raise ArtifactError(f"no finished class-agnostic detector in {cag} (model.pt, manifest.json): "
                            f"{base.hints.prerequisite}")
    trained_on = ((read_json(cag / "manifest.json").get("artifact") or {}).get("input_sha256"))
    if trained_on != sha256_file(base.in_path):
        raise ArtifactError(f"{model} was trained on another version of {base.in_path}: {base.hints.prerequisite}")
    labels, recipe, schedule = base.in_path, s.recipe(base.recipe), s.schedule(base.schedule)
    artifact = {**{k: v for k, v in base.artifact.items() if k != "recipe"}, "schedule": schedule.to_dict()}
    if recipe.recorded():
        artifact["recipe"] = recipe.recorded()
    for r in range(1, s.rounds + 1):
        final = cag / f"round{r}"
        recover_replacement(final)
        folder = begin_replacement(final, keep=s.resume) if base.force else final
        labels = round_labels(r, folder, model, labels, s, image_root=base.image_root, device=device,
                              batch_size=base.evaluation.batch_size, progress=base.progress, forced=base.force)
        p = dataclasses.replace(
            base, stage="self_train", stage_dir=folder, in_path=labels, input_name="pseudo_labels",
            config={**base.config, "stage_dir": str(folder)}, init_from=model, recipe=recipe, schedule=schedule,
            artifact={**artifact, "self_train": {"round": r, "score_threshold": s.threshold(r)}},
            force=False, resume=s.resume, stop_after=s.stop_after, what=f"round {r}'s pseudo-label file",
            producer=f" (written by self-train round {r})")
        if train_detector(p) is None:
            return None
        if folder != final:
            commit_replacement(final, folder)
            labels = final / "pseudo_labels.json"
            print(f"self-train round {r}: results swapped into {final}/", flush=True)
        model = final / "model.pt"
    table = rounds_table(cag)
    print(format_rounds(table), flush=True)
    return table
