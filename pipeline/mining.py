"""Mining: images -> backbone features -> a miner -> ranked boxes, one journal line per image.

:class:`MiningRun` owns a run: which images this shard mines (``shard`` of ``num_shards`` takes every
``num_shards``-th image), its journal (a JSON-lines file per shard, resumable, see
:mod:`pipeline.journal`) and the journal's metadata (what produced the results), collecting the shards
and merging them into the COCO ``pseudo_boxes.json``.

:func:`mine_images` is the loop and :func:`pipeline.parallel.mine_in_processes` the same loop in one-thread
worker processes;
both hand every image's row to *sinks* (:class:`MiningSink`, as detectron2's ``DatasetEvaluator`` for
``inference_on_dataset``): the run's journal (a :class:`MiningRun` is a sink), and those of
:mod:`pipeline.mining_sinks` (pictures, progress with the running CorLoc, timing). Neither names an
algorithm (the :class:`~pipeline.discovery.Miner` says what it needs).

Results are per image, keyed by the image id: a run grown to more images mines only the new ones, and an
image that failed (corrupt file) is not done: the next run retries it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader

from pipeline.data.records import Dataset, ImageRecord
from pipeline.journal import Journal, JournalMismatch, canonical_json, discard_journal


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards): got shard={shard}, num_shards={num_shards}")
    return list(range(shard, n, num_shards))


def shard_journal_path(results_dir: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(results_dir) / f"shard-{shard:04d}-of-{num_shards:04d}.jsonl"


class MiningSink:
    """What the mining loop hands every image to: ``process(index, record, result, row, size)`` once per image
    (``index`` in the dataset's records, ``result`` the miner's result or None when the image failed, ``row``
    its journal row (:func:`make_row`), ``size`` the (H, W) the miner saw, None when it failed), then
    ``finish()`` once after the last.

    A sink with ``needs_result`` (pictures) reads the miner's result; the others read only rows. The loop calls
    the ``needs_result`` sinks first (so an image in the journal has its picture), the rest in the order given.
    In :func:`pipeline.parallel.mine_in_processes` the ``needs_result`` sinks run in the worker that mined the
    image (a copy of the sink: forked, or pickled to a spawned worker), the others in the parent, which gets
    the rows (``result=None``)."""

    needs_result: bool = False

    def process(self, index: int, record: ImageRecord, result, row: dict, size) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


def mining_info(method: str, params: dict, backbone, *, feature: str, dataset: str, image_root: str,
                config: dict) -> dict:
    """What produces a run's boxes: the journal's metadata (identical for every shard) and pseudo_boxes.json's
    ``info``: the miner ``method`` and its ``params``, the built ``backbone`` (its description, weights and
    whether they are random), the ``feature``, the dataset's name and image root, and the ``config`` it came from."""
    from pipeline.provenance import random_init

    desc = backbone.describe()
    return {"description": f"{method} pseudo-boxes", "method": method,
            "miner_params": {k: v for k, v in params.items() if k != "name"}, "backbone": desc, "feature": feature,
            "random_init": random_init(backbone=desc), "weights_sha256": desc.get("weights_sha256"),
            "dataset": dataset, "image_root": image_root, "config": config}


class MiningRun(MiningSink):
    """One mining run in ``stage_dir``: ``info`` (what produces the boxes; identical for every shard) is the
    journal's metadata, so resuming with another configuration raises
    :class:`~pipeline.journal.JournalMismatch` instead of mixing results. As a :class:`MiningSink` it
    journals every row it is handed."""

    def __init__(self, stage_dir: str | os.PathLike, info: dict, *, shard: int = 0, num_shards: int = 1) -> None:
        shard_indices(0, shard, num_shards)  # validates
        self.stage_dir = Path(stage_dir)
        self.results_dir = self.stage_dir / "results"
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.meta = canonical_json({"info": info, "num_shards": self.num_shards})
        self.journal_path = shard_journal_path(self.results_dir, self.shard, self.num_shards)
        self._journal: Journal | None = None

    @classmethod
    def from_results(cls, stage_dir: str | os.PathLike, num_shards: int) -> "MiningRun":
        """The run whose shard journals are in ``stage_dir/results`` (to merge them without recomputing what
        produced them): its metadata is read from shard 0's."""
        from pipeline.artifacts import read_json
        from pipeline.journal import meta_path_of

        path = meta_path_of(shard_journal_path(Path(stage_dir) / "results", 0, num_shards))
        meta = read_json(path, "shard journal meta", hint=f"Run the {num_shards} mining shards first.")
        return cls(stage_dir, meta["info"], shard=0, num_shards=num_shards)

    @property
    def info(self) -> dict:
        return self.meta["info"]

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.journal_path, self.meta, key="image_id")
        return self._journal

    def discard(self) -> None:
        """Forget this shard's results (``force``)."""
        discard_journal(self.journal_path)
        self._journal = None

    def pending(self, records: Sequence[ImageRecord], *, discard_other: bool = False) -> list[int]:
        """Indices of this shard's images without a successful row: new images and failed ones. A journal of
        another configuration raises :class:`~pipeline.journal.JournalMismatch`, or with ``discard_other`` (a
        forced run) is discarded: what a killed forced run of this configuration mined is continued."""
        try:
            journal = self.journal.load()
        except JournalMismatch:
            if not discard_other:
                raise
            self.discard()
            journal = self.journal.load()
        done = {k for k, r in journal.items() if r.get("error") is None}
        return [i for i in shard_indices(len(records), self.shard, self.num_shards)
                if records[i].image_id not in done]

    def mined_all(self, records: Sequence[ImageRecord]) -> bool:
        """Whether every image of this shard has a successful row, read without opening the journal (nothing is
        created, and a journal of another configuration is not checked here: :meth:`pending` checks it)."""
        import json

        done = set()
        if self.journal_path.is_file():
            for line in self.journal_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a torn last line
                    continue
                if row.get("error") is None:
                    done.add(row.get("image_id"))
        return all(records[i].image_id in done for i in shard_indices(len(records), self.shard, self.num_shards))

    def record(self, row: dict) -> None:
        self.journal.append(row)

    def process(self, index: int, record: ImageRecord, result, row: dict, size) -> None:
        self.record(row)

    def collect(self, records: Sequence[ImageRecord]) -> list[dict] | None:
        """The rows of every image of ``records`` from all shard journals, in record order (the last row of an
        image wins: a retried image replaces its failure), or None while some image has no row yet."""
        rows: dict[str, dict] = {}
        for s in range(self.num_shards):
            path = shard_journal_path(self.results_dir, s, self.num_shards)
            if path.exists():
                rows.update(Journal(path, self.meta, key="image_id").load())
        if any(r.image_id not in rows for r in records):
            return None
        return [{**rows[r.image_id], "index": i} for i, r in enumerate(records)]

    def write_merged(self, rows: Sequence[dict], dataset: Dataset) -> dict:
        """Write ``stage_dir/pseudo_boxes.json`` from :meth:`collect`'s rows; returns :func:`mining_metrics`."""
        from pipeline.artifacts import write_json

        write_json(self.stage_dir / "pseudo_boxes.json", self.to_coco(rows))
        return mining_metrics(rows, dataset, self.info)

    def to_coco(self, rows: Sequence[dict]) -> dict:
        """Rows -> the COCO ``pseudo_boxes.json`` dict: one annotation per box with its ``score`` and ``rank``
        (file names relative to ``info.image_root``); an image mining failed on carries its ``mining_error``."""
        from pipeline.artifacts import coco_boxes_dataset
        from pipeline.masks import rle_area

        root = self.info["image_root"]
        images, anns = [], []
        for r in rows:
            images.append({"id": int(r["coco_id"]), "file_name": os.path.relpath(r["path"], root),
                           "width": r["width"], "height": r["height"], "dataset_id": r["image_id"]})
            if r["error"] is not None:  # later stages leave it out (no detector runs on an image mining failed on)
                images[-1]["mining_error"] = r["error"]
            masks = r.get("masks") or [None] * len(r["boxes"])  # rows journaled before masks have none
            for rank, (box, score, mask) in enumerate(zip(r["boxes"], r["scores"], masks)):
                ann = {"image_id": int(r["coco_id"]), "bbox_xyxy": box, "category_id": 1, "score": score,
                       "rank": rank}
                if rank == 0:
                    ann["seed"] = r["seed"]
                if mask is not None:
                    ann.update(segmentation=mask, area=float(rle_area(mask)))
                anns.append(ann)
        return coco_boxes_dataset(images, anns, info=self.info)


PHASES = ("load", "forward", "miner", "sinks")


@dataclass
class MineStats:
    """What one mining loop did (in this process or one worker): images mined, wall seconds, seconds per
    phase (``load``: waiting for decoded images; ``forward``: the backbone; ``miner``; ``sinks``), when it
    started and ended (``time.time()``); a worker's also how long it took to get ready (``setup_s``: building
    the model in a spawned worker) and its peak memory."""
    images: int = 0
    seconds: float = 0.0
    phases: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    started_at: float = 0.0
    ended_at: float = 0.0
    setup_s: float = 0.0
    peak_rss_gib: float | None = None


def ordered_sinks(sinks: Sequence[MiningSink]) -> list[MiningSink]:
    """The sinks that need the miner's result first (so a journaled image has its picture), then the others."""
    return [s for s in sinks if s.needs_result] + [s for s in sinks if not s.needs_result]


def _sync(device) -> None:
    """Wait for the device (CUDA) so the phase timings are the phases' own."""
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def mine_images(dataset: Dataset, backbone, miner, indices: Sequence[int], sinks: Sequence[MiningSink] = (), *,
                feature: str = "k", num_workers: int = 0, max_side: int | None = None,
                batch_size: int = 1) -> MineStats:
    """Mine ``dataset.records[i]`` for ``i`` in ``indices`` with ``miner`` (a built
    :class:`~pipeline.discovery.Miner`) and hand each image to every sink (:class:`MiningSink`), in the
    order of ``indices``; then ``finish()`` every sink. Images are resized when ``max_side`` (longer side) or
    the miner's ``input_size`` (square) ask for it; boxes are mapped back to the original pixels.
    ``batch_size`` images are decoded (in ``num_workers`` DataLoader workers), run through the backbone
    (grouped by size: ``Backbone.features_batch``, exact on a CPU) and the miner (``Miner.mine_batch``)
    together; their rows go to the sinks in order, so a killed run loses at most one batch."""
    from pipeline.data import MiningImages, collate_list

    sinks, stats = ordered_sinks(sinks), MineStats(started_at=time.time())
    device = getattr(backbone, "device", None)
    images = MiningImages(dataset.records, backbone.patch_size, indices=list(indices), max_side=max_side,
                          square=miner.input_size)
    loader = DataLoader(images, batch_size=max(1, int(batch_size)), shuffle=False, num_workers=num_workers,
                        collate_fn=collate_list, persistent_workers=False,
                        pin_memory=str(device).startswith("cuda"))
    t, it = stats.phases, iter(loader) if indices else iter(())  # no DataLoader workers for nothing
    while True:
        t0 = time.perf_counter()
        items = next(it, None)
        if items is None:
            break
        t1 = time.perf_counter()
        ok = [x for x in items if x["error"] is None]
        outs = backbone.features_batch([x["image"] for x in ok], which=feature, with_cls_attn=miner.needs.cls_attn,
                                       max_batch=max(1, int(batch_size))) if ok else []
        _sync(device)
        t2 = time.perf_counter()
        found = dict(zip((x["index"] for x in ok), miner.mine_batch(outs, [x["size"] for x in ok]) if ok else []))
        t3 = time.perf_counter()
        for item in items:
            result = found.get(item["index"])
            row = make_row(item["record"], item["size"], result, item["error"], item["original_size"],
                           patch_size=backbone.patch_size, image=item["image"] if miner.crf else None)
            for sink in sinks:
                sink.process(item["index"], item["record"], result, row, item["size"])
            stats.images += 1
        for key, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            t[key] += seconds
    for sink in sinks:
        sink.finish()
    stats.ended_at = time.time()
    stats.seconds = stats.ended_at - stats.started_at
    return stats


def make_row(rec: ImageRecord, size, result, error: str | None, original_size=None, *,
             patch_size: int | None = None, image=None) -> dict:
    """The journal row of one image: its boxes in rank order with their scores (none when it failed), in the
    pixels of the original image (``size`` is what the miner saw, ``original_size`` the decoded image), and
    with ``patch_size`` each box's object mask as compressed RLE of the original image
    (:func:`pipeline.masks.patch_mask_to_pixels`). With ``image`` (the network input the miner saw) each mask is
    refined by a dense CRF on it first, and an object whose refined mask moved too far is dropped
    (:func:`pipeline.masks.refine_or_drop`; counted in ``crf_dropped``)."""
    from pipeline.data.loader import box_to_original
    from pipeline.discovery import boxes_of
    from pipeline.masks import encode_rle, patch_mask_to_pixels, resize_mask

    original_size = original_size or size
    h, w = original_size if original_size is not None else (rec.height, rec.width)
    row = {"image_id": rec.image_id, "coco_id": rec.coco_id, "path": rec.path, "width": w, "height": h,
           "error": error, "boxes": [], "scores": [], "seed": None}
    if result is not None:
        mined = boxes_of(result)
        pixels = [patch_mask_to_pixels(b.mask, patch_size, size) for b in mined] \
            if patch_size and all(b.mask is not None for b in mined) else None
        if pixels is not None and image is not None:
            mined, pixels, row["crf_dropped"] = _crf(mined, pixels, image, size)
        resized = tuple(original_size) != tuple(size)
        row["boxes"] = [[float(v) for v in box_to_original(b.box, size, original_size)] if resized else list(b.box)
                        for b in mined]
        row["scores"] = [b.score for b in mined]
        seed = getattr(result, "seed", None)
        row["seed"] = None if seed is None else int(seed)
        if pixels is not None:
            row["masks"] = [encode_rle(resize_mask(m, (h, w))) for m in pixels]
    return row


def _crf(mined: list, pixels: list, image, size) -> tuple[list, list, int]:
    """The objects whose CRF-refined mask (on the de-normalised network input) is kept, their refined masks, and
    how many were dropped."""
    from pipeline.data.preprocess import unnormalize_image
    from pipeline.masks import refine_or_drop

    rgb = unnormalize_image(image, size)
    refined = [refine_or_drop(rgb, m) for m in pixels]
    kept = [i for i, m in enumerate(refined) if m is not None]
    return [mined[i] for i in kept], [refined[i] for i in kept], len(mined) - len(kept)


def first_boxes(rows: Sequence[dict]) -> dict[str, np.ndarray | None]:
    """image id -> its rank-0 box (the single-object protocol's box), None when it has none."""
    return {r["image_id"]: (np.asarray(r["boxes"][0], dtype=np.float64) if r["boxes"] else None) for r in rows}


def all_boxes(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """image id -> (n, 4) every box of the image, in rank order."""
    return {r["image_id"]: np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4) for r in rows}


def mining_metrics(rows: Sequence[dict], dataset: Dataset, info: dict) -> dict:
    """The numbers of a finished run: images, boxes, failures (named), and with GT the CorLoc of the first boxes
    and, when some image has several boxes, the multi-box scores (object recall, any-box CorLoc)."""
    from pipeline.evaluation.corloc import corloc
    from pipeline.evaluation.multi import multi_box_scores

    failures = [{"image_id": r["image_id"], "path": r["path"], "error": r["error"]} for r in rows if r["error"]]
    metrics = {"images": len(rows), "boxes": sum(len(r["boxes"]) for r in rows),
               "images_with_boxes": sum(bool(r["boxes"]) for r in rows), "failures": len(failures),
               "failed_images": failures, "method": info["method"], "backbone": info["backbone"]["arch"],
               "feature": info["feature"], "random_init": info["random_init"], "corloc": None, "corloc_hits": None,
               "corloc_total": None, "multi_box": None}
    if dataset.has_gt:
        res = corloc(first_boxes(rows), dataset.records)
        metrics.update(corloc=res.corloc, corloc_hits=res.hits, corloc_total=res.total)
        if any(len(r["boxes"]) > 1 for r in rows):
            metrics["multi_box"] = multi_box_scores(all_boxes(rows), dataset.records).as_dict()
    if any("crf_dropped" in r for r in rows):  # objects whose CRF-refined mask moved too far (miner crf)
        metrics["crf_dropped"] = sum(int(r.get("crf_dropped", 0)) for r in rows)
    if dataset.has_masks and any(r.get("masks") for r in rows):
        metrics.update(pseudo_mask_scores(rows, dataset.records))
    return metrics


def pseudo_mask_scores(rows: Sequence[dict], records) -> dict:
    """:func:`pipeline.evaluation.coco_ap.box_and_mask_ap` of the ranked pseudo-boxes and their masks, scored by
    the miner's score, as CutLER scores MaskCut."""
    from pipeline.evaluation.coco_ap import box_and_mask_ap

    return box_and_mask_ap(records, [
        {"image_id": int(r["coco_id"]), "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
         "score": float(s), "segmentation": m}
        for r in rows for b, s, m in zip(r["boxes"], r["scores"], r.get("masks") or [])])


def format_mining_summary(metrics: dict, stage_dir: str | os.PathLike, made: Sequence[str] | None) -> str:
    """The lines a run prints about its :func:`mining_metrics` and the files it ``made`` in ``stage_dir`` (None:
    nothing was written; with ``pseudo_boxes.json`` among them, also what this run mined)."""
    lines = [f"mine: {metrics['images']} images, {metrics['boxes']} boxes, {metrics['failures']} failed"]
    if made is not None and "pseudo_boxes.json" in made and metrics.get("computed_this_run"):
        lines[0] += (f"; this run mined {metrics['computed_this_run']} in {metrics['seconds']:.1f} s "
                     f"({metrics['images_per_s']:.2f} images/s)")
    tag = "  [RANDOM WEIGHTS: smoke test, not a result]" if metrics["random_init"] else ""
    if metrics["corloc"] is not None:
        lines.append(f"CorLoc (first box): {metrics['corloc']:.2f} % ({metrics['corloc_hits']}/"
                     f"{metrics['corloc_total']}){tag}")
    mb = metrics.get("multi_box")
    if mb and mb.get("object_recall") is not None:
        lines.append(f"object recall @0.5: {mb['object_recall']:.2f} % ({mb['objects_covered']}/"
                     f"{mb['objects_total']}), "
                     f"{mb['boxes_per_image']:.2f} boxes/image, any-box CorLoc (MOST's protocol, not CorLoc): "
                     f"{mb['any_box_corloc']:.2f} %{tag}")
    for key, what in (("box_ap", "box"), ("mask", "mask")):
        if metrics.get(key):
            m = metrics[key]
            lines.append(f"pseudo-{what} AP (class-agnostic, COCO style): AP {m['AP']:.2f}, AP50 {m['AP50']:.2f}, "
                         f"AP75 {m['AP75']:.2f}, AR100 {m['AR100']:.2f}{tag}")
    lines += [f"  failed: {f['path']}: {f['error']}" for f in metrics["failed_images"][:10]]
    lines.append(f"artifacts: {stage_dir}/ " + ("(unchanged)" if made is None else f"({', '.join(made)})"))
    return "\n".join(lines)
