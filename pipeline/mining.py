"""Mining: images -> backbone features -> a miner -> ranked boxes, one journal line per image.

:class:`MiningRun` owns a run: which images this shard mines (``shard`` of ``num_shards`` takes every
``num_shards``-th image), its journal (a JSON-lines file per shard, resumable, see
:mod:`pipeline.journal`) and the journal's metadata (what produced the results), collecting the shards
and merging them into the COCO ``pseudo_boxes.json``. :func:`mine_images` is the loop; it hands every
row to the run and never names an algorithm (the :class:`~pipeline.discovery.Miner` says what it needs).

Results are per image, keyed by the image id: a run grown to more images mines only the new ones, and an
image that failed (corrupt file) is not done: the next run retries it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.data.records import Dataset, ImageRecord
from pipeline.journal import Journal, canonical_json, discard_journal


SLOW_IMAGE_S = 20.0   # seconds per image above which the progress bar names the image


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards): got shard={shard}, num_shards={num_shards}")
    return list(range(shard, n, num_shards))


def shard_journal_path(results_dir: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(results_dir) / f"shard-{shard:04d}-of-{num_shards:04d}.jsonl"


class MiningRun:
    """One mining run in ``stage_dir``: ``info`` (what produces the boxes; identical for every shard) is the
    journal's metadata, so resuming with another configuration raises
    :class:`~pipeline.journal.JournalMismatch` instead of mixing results."""

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
        meta = read_json(path, "shard journal meta", hint=f"Run the {num_shards} mining shards first "
                         f"(mine.num_shards={num_shards}).")
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

    def pending(self, records: Sequence[ImageRecord]) -> list[int]:
        """Indices of this shard's images without a successful row: new images and failed ones."""
        done = {k for k, r in self.journal.load().items() if r.get("error") is None}
        return [i for i in shard_indices(len(records), self.shard, self.num_shards)
                if records[i].image_id not in done]

    def record(self, row: dict) -> None:
        self.journal.append(row)

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

    def to_coco(self, rows: Sequence[dict]) -> dict:
        """Rows -> the COCO ``pseudo_boxes.json`` dict: one annotation per box with its ``score`` and ``rank``
        (file names relative to ``info.image_root``); an image mining failed on carries its ``mining_error``."""
        from pipeline.artifacts import coco_boxes_dataset

        root = self.info["image_root"]
        images, anns = [], []
        for r in rows:
            images.append({"id": int(r["coco_id"]), "file_name": os.path.relpath(r["path"], root),
                           "width": r["width"], "height": r["height"], "dataset_id": r["image_id"]})
            if r["error"] is not None:  # later stages leave it out (no detector runs on an image mining failed on)
                images[-1]["mining_error"] = r["error"]
            for rank, (box, score) in enumerate(zip(r["boxes"], r["scores"])):
                ann = {"image_id": int(r["coco_id"]), "bbox_xyxy": box, "category_id": 1, "score": score,
                       "rank": rank}
                if rank == 0:
                    ann["seed"] = r["seed"]
                anns.append(ann)
        return coco_boxes_dataset(images, anns, info=self.info)


@dataclass
class MineStats:
    computed: int = 0          # images mined in this process
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def make_row(rec: ImageRecord, size, result, error: str | None, original_size=None) -> dict:
    """The journal row of one image: its boxes in rank order with their scores (none when it failed), in the
    pixels of the original image (``size`` is what the miner saw, ``original_size`` the decoded image)."""
    from pipeline.data.loader import box_to_original
    from pipeline.discovery import boxes_of

    original_size = original_size or size
    h, w = original_size if original_size is not None else (rec.height, rec.width)
    row = {"image_id": rec.image_id, "coco_id": rec.coco_id, "path": rec.path, "width": w, "height": h,
           "error": error, "boxes": [], "scores": [], "seed": None}
    if result is not None:
        mined = boxes_of(result)
        resized = tuple(original_size) != tuple(size)
        row["boxes"] = [[float(v) for v in box_to_original(b.box, size, original_size)] if resized else list(b.box)
                        for b in mined]
        row["scores"] = [b.score for b in mined]
        seed = getattr(result, "seed", None)
        row["seed"] = None if seed is None else int(seed)
    return row


def mine_images(
    dataset: Dataset,
    backbone,
    miner,
    indices: Sequence[int],
    *,
    record: Callable[[dict], None] | None,
    feature: str = "k",
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    max_side: int | None = None,
    batch_size: int = 1,
    on_result: Callable[[int, ImageRecord, object, dict, tuple], None] | None = None,
    hit_fn: Callable[[ImageRecord, dict], bool | None] | None = None,
) -> MineStats:
    """Mine ``dataset.records[i]`` for ``i`` in ``indices`` with ``miner`` (a built
    :class:`~pipeline.discovery.Miner`) and hand each row to ``record`` (e.g. ``MiningRun.record``; None
    for a dry pass that only makes pictures). Images are resized when ``max_side`` (longer side) or the
    miner's ``input_size`` (square) ask for it; boxes are mapped back to the original pixels.
    ``on_result(index, record, result, row, size)`` is called for every image mined, before its row is
    recorded (so a recorded image has its picture); ``size`` is the (H, W) the miner saw. ``hit_fn(record,
    row)`` feeds the running CorLoc in the progress bar. ``batch_size`` images are decoded (in
    ``num_workers`` DataLoader workers), run through the backbone (grouped by size:
    ``Backbone.features_batch``, exact on a CPU) and the miner (``Miner.mine_batch``) together; their rows
    are recorded in order, so a killed run loses at most one batch."""
    from pipeline.data import MiningImages, collate_list

    run = MineStats()
    if not indices:
        return run
    images = MiningImages(dataset.records, backbone.patch_size, indices=list(indices), max_side=max_side,
                          square=miner.input_size)
    loader = DataLoader(images, batch_size=max(1, int(batch_size)), shuffle=False, num_workers=num_workers,
                        collate_fn=collate_list, persistent_workers=False,
                        pin_memory=str(device).startswith("cuda"))
    hits = total = 0
    start = time.time()
    bar = tqdm(total=len(indices), disable=not progress, desc=f"mine {dataset.name}", unit="img",
               dynamic_ncols=True)
    needs = miner.needs
    t_batch = time.time()
    for items in loader:
        ok = [x for x in items if x["error"] is None]
        outs = backbone.features_batch([x["image"] for x in ok], which=feature, with_cls_attn=needs.cls_attn,
                                       max_batch=max(1, int(batch_size))) if ok else []
        found = dict(zip((x["index"] for x in ok), miner.mine_batch(outs, [x["size"] for x in ok]) if ok else []))
        for item in items:
            _record_item(item, found.get(item["index"]), run, bar, record, on_result)
            if hit_fn is not None and item["row"] is not None:
                hit = hit_fn(item["record"], item["row"])
                if hit is not None:
                    hits += int(hit)
                    total += 1
                    bar.set_postfix(corloc=f"{100.0 * hits / total:.1f}%", failed=len(run.failures))
        per_image = (time.time() - t_batch) / max(1, len(items))
        if per_image > SLOW_IMAGE_S:  # a huge photo looks like a hang: say which one (dataset.max_side helps)
            big = max(ok, key=lambda x: x["size"][0] * x["size"][1]) if ok else items[0]
            bar.write(f"slow: {big['record'].image_id} ({big['size'][1]}x{big['size'][0]} px) took "
                      f"{per_image:.0f} s; dataset.max_side=1024 shrinks big images")
        t_batch = time.time()
    bar.close()
    run.seconds = time.time() - start
    return run


def _record_item(item: dict, result, run: "MineStats", bar, record, on_result) -> None:
    """One image's row: picture first (a recorded image has its picture), then the journal line."""
    index, rec = item["index"], item["record"]
    row = make_row(rec, item["size"], result, item["error"], item["original_size"])
    item["row"] = row
    if on_result is not None and result is not None:
        on_result(index, rec, result, row, item["size"])
    if record is not None:
        record(row)
    run.computed += 1
    bar.update(1)
    if item["error"] is not None:
        run.failures.append({"image_id": rec.image_id, "path": rec.path, "error": item["error"]})
        bar.write(f"skipped {rec.path}: {item['error']}")


def first_boxes(rows: Sequence[dict]) -> dict[str, np.ndarray | None]:
    """image id -> its rank-0 box (the single-object protocol's box), None when it has none."""
    return {r["image_id"]: (np.asarray(r["boxes"][0], dtype=np.float64) if r["boxes"] else None) for r in rows}


def all_boxes(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """image id -> (n, 4) every box of the image, in rank order."""
    return {r["image_id"]: np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4) for r in rows}
