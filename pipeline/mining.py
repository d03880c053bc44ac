"""The mining loop: images -> backbone features -> miner -> one journal line per image.

Sharded (``shard`` of ``num_shards`` takes every ``num_shards``-th image) and resumable (images already in
the shard's journal are skipped). Corrupt images are journalled with their error and never stop the run.
Results are merged into the COCO ``pseudo_boxes.json`` by :func:`merge_shards` once every shard is done.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.data.records import Dataset, ImageRecord
from pipeline.journal import Journal


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards): got shard={shard}, num_shards={num_shards}")
    return list(range(shard, n, num_shards))


def shard_journal_path(results_dir: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(results_dir) / f"shard-{shard:04d}-of-{num_shards:04d}.jsonl"


@dataclass
class MineRun:
    computed: int = 0          # images mined in this process
    resumed: int = 0           # images found done in the journal and skipped
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def _row(index: int, rec: ImageRecord, size, result, error: str | None) -> dict:
    h, w = size if size is not None else (rec.height, rec.width)
    row = {"index": index, "image_id": rec.image_id, "coco_id": rec.coco_id, "path": rec.path,
           "width": w, "height": h, "error": error, "box": None, "score": None, "seed": None}
    if result is not None:
        row["box"] = [float(v) for v in np.asarray(result.box).reshape(4)]
        row["score"] = float(result.score)
        seed = getattr(result, "seed", None)
        row["seed"] = None if seed is None else int(seed)
    return row


def mine_images(
    dataset: Dataset,
    backbone,
    *,
    miner: str,
    miner_params: dict,
    feature: str,
    journal: Journal,
    shard: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    on_result: Callable[[int, ImageRecord, object, dict], None] | None = None,
    hit_fn: Callable[[ImageRecord, dict], bool | None] | None = None,
) -> MineRun:
    """Mine this shard's images not yet in ``journal``; return counts. ``on_result(index, record, result,
    row)`` is called for every computed image (pictures); ``hit_fn(record, row)`` feeds the running CorLoc."""
    from pipeline.data import MiningImages, collate_single
    from pipeline.discovery import run_miner

    done = journal.load()
    todo = [i for i in shard_indices(len(dataset), shard, num_shards) if i not in done]
    run = MineRun(resumed=len(shard_indices(len(dataset), shard, num_shards)) - len(todo))
    if not todo:
        return run
    loader = DataLoader(MiningImages(dataset.records, backbone.patch_size, indices=todo), batch_size=1,
                        shuffle=False, num_workers=num_workers, collate_fn=collate_single,
                        persistent_workers=False)
    hits = total = 0
    start = time.time()
    bar = tqdm(loader, total=len(todo), disable=not progress, desc=f"mine {dataset.name}", unit="img",
               dynamic_ncols=True)
    with_cls = miner == "dinoseg"
    for item in bar:
        index, rec = item["index"], item["record"]
        result = None
        if item["error"] is None:
            out = backbone.features(item["image"][None].to(device), which=feature, with_cls_attn=with_cls)
            result = run_miner(miner, out, item["size"], patch_size=backbone.patch_size, **miner_params)
        row = _row(index, rec, item["size"], result, item["error"])
        if on_result is not None and result is not None:
            on_result(index, rec, result, row)  # before the journal line: a journalled image has its picture
        journal.append(row)
        run.computed += 1
        if item["error"] is not None:
            run.failures.append({"image_id": rec.image_id, "path": rec.path, "error": item["error"]})
            bar.write(f"skipped {rec.path}: {item['error']}")
        if hit_fn is not None:
            hit = hit_fn(rec, row)
            if hit is not None:
                hits += int(hit)
                total += 1
                bar.set_postfix(corloc=f"{100.0 * hits / total:.1f}%", failed=len(run.failures))
    run.seconds = time.time() - start
    return run


def collect_shards(results_dir: str | os.PathLike, n_images: int, num_shards: int,
                   meta: dict) -> list[dict] | None:
    """All journal rows of a run, ordered by image index, or None while some shard is incomplete."""
    rows: dict[int, dict] = {}
    for s in range(num_shards):
        path = shard_journal_path(results_dir, s, num_shards)
        if not path.exists():
            return None
        rows.update(Journal(path, meta).load())
    if len(rows) < n_images or any(i not in rows for i in range(n_images)):
        return None
    return [rows[i] for i in range(n_images)]


def rows_to_coco(rows: list[dict], info: dict) -> dict:
    """Journal rows -> the COCO ``pseudo_boxes.json`` dict (file names relative to ``info.image_root``)."""
    from pipeline.artifacts import coco_boxes_dataset

    root = info["image_root"]
    images, anns = [], []
    for r in rows:
        images.append({"id": int(r["coco_id"]), "file_name": os.path.relpath(r["path"], root),
                       "width": r["width"], "height": r["height"], "dataset_id": r["image_id"]})
        if r["box"] is not None:
            anns.append({"image_id": int(r["coco_id"]), "bbox_xyxy": r["box"], "category_id": 1,
                         "score": r["score"], "seed": r["seed"]})
    return coco_boxes_dataset(images, anns, info=info)


def image_root(records: list[ImageRecord]) -> str:
    dirs = {os.path.dirname(os.path.abspath(r.path)) for r in records}
    return os.path.commonpath(sorted(dirs)) if dirs else ""


def predictions_from_rows(rows: list[dict]) -> dict[str, np.ndarray | None]:
    return {r["image_id"]: (None if r["box"] is None else np.asarray(r["box"], dtype=np.float64)) for r in rows}

