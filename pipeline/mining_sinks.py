"""Sinks of the mining loop (:class:`~pipeline.mining.MiningSink`): what happens to each mined image besides
its journal line (a :class:`~pipeline.mining.MiningRun` is itself the journal's sink).

- :class:`Pictures`: the mining pictures of the first images and their contact sheet (needs the miner's
  result: in process-parallel mining it runs in the worker that mined the image);
- :class:`Progress`: the progress bar with the running CorLoc of the first boxes, failed and slow images named;
- :class:`Timing`: images mined, failures and seconds, as the consumer of the rows sees them.

    run = MiningRun(stage_dir, info)
    timing = Timing()
    mine_images(dataset, backbone, miner, run.pending(dataset.records),
                [Pictures(stage_dir / "viz", 8, backbone.patch_size), run, Progress(n, "mine voc07"), timing])
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.data.records import ImageRecord
from pipeline.mining import MiningSink, first_boxes

SLOW_IMAGE_S = 20.0   # seconds per image above which the progress bar names the image


class Pictures(MiningSink):
    """The mining picture (:func:`pipeline.viz.draw_result`) of every image whose index is below ``num_images``,
    as ``folder/<index>_<stem>.png``, drawn on the image as the miner saw it (resized when it was), titled with
    the image id and ``tag``; :meth:`write_sheet` tiles the first ``sheet_images`` into ``sheet``. Parameters
    only (paths, numbers, text): it pickles to a spawned worker."""

    needs_result = True

    def __init__(self, folder: str | os.PathLike, num_images: int, patch_size: int, *, tag: str = "",
                 sheet: str | os.PathLike | None = None, sheet_images: int = 0) -> None:
        self.folder, self.n, self.patch, self.tag = Path(folder), int(num_images), int(patch_size), tag
        self.sheet, self.sheet_images = (None if sheet is None else Path(sheet)), int(sheet_images)

    def process(self, index: int, record: ImageRecord, result, row: dict, size) -> None:
        from pipeline.data import load_image
        from pipeline.data.loader import resize_to
        from pipeline.viz import draw_result, save_png

        if index >= self.n or result is None:
            return
        img = load_image(record.path)
        gt = record.boxes if record.has_gt else None
        if img.shape[:2] != tuple(size):
            fy, fx = size[0] / img.shape[0], size[1] / img.shape[1]
            img = resize_to(img, size)
            gt = None if gt is None else np.asarray(gt, dtype=np.float64) * [fx, fy, fx, fy]
        pic = draw_result(img, result, self.patch, gt, f"{record.image_id}{self.tag}")
        save_png(pic, self.folder / f"{index:06d}_{Path(record.image_id).stem}.png")

    def clear(self) -> None:
        """Remove the pictures and the sheet (before they are redrawn)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.sheet is not None:
            self.sheet.unlink(missing_ok=True)

    def write_sheet(self) -> list[str]:
        """Tile the pictures into the contact sheet; the names of what exists (``folder/``, the sheet)."""
        from pipeline.viz.mining import contact_sheet

        pics = sorted(p for p in self.folder.glob("*.png") if not p.name.startswith("."))
        made = [f"{self.folder.name}/"] if pics else []
        if self.sheet is not None and self.sheet_images > 0 and pics and contact_sheet(pics[: self.sheet_images],
                                                                                       self.sheet):
            made.append(self.sheet.name)
        return made


def first_box_hit(record: ImageRecord, row: dict) -> bool | None:
    """Whether the image's first box hits its GT (CorLoc's rule); None without GT to score against."""
    from pipeline.evaluation.corloc import corloc

    if not record.has_gt:
        return None
    res = corloc(first_boxes([row]), [record])
    return None if res.total == 0 else res.hits == 1


class Progress(MiningSink):
    """A progress bar of ``total`` images (``enabled=False``: none) with the running CorLoc of the first boxes
    and the count of failed images; a failed image is named as it comes, and so is an image that took more than
    ``slow_s`` seconds since the previous one (a huge photo looks like a hang), followed by ``slow_hint``."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, slow_s: float = SLOW_IMAGE_S,
                 slow_hint: str = "") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True)
        self.slow_s, self.slow_hint = float(slow_s), slow_hint
        self.hits = self.scored = self.failed = 0
        self.last = time.time()

    def process(self, index: int, record: ImageRecord, result, row: dict, size) -> None:
        now = time.time()
        took, self.last = now - self.last, now
        self.bar.update(1)
        if row["error"] is not None:
            self.failed += 1
            self.bar.write(f"skipped {record.path}: {row['error']}")
        hit = first_box_hit(record, row)
        if hit is not None:
            self.hits, self.scored = self.hits + int(hit), self.scored + 1
            self.bar.set_postfix(corloc=f"{100.0 * self.hits / self.scored:.1f}%", failed=self.failed)
        if took > self.slow_s and size is not None:
            self.bar.write(f"slow: {record.image_id} ({size[1]}x{size[0]} px) took {took:.0f} s"
                           + (f"; {self.slow_hint}" if self.slow_hint else ""))

    def finish(self) -> None:
        self.bar.close()


class Timing(MiningSink):
    """Images mined, the failed ones (image id, path, error) and the seconds from this sink's creation to
    ``finish()``: a run's account, the same whether one process or several mined."""

    def __init__(self) -> None:
        self.start = time.time()
        self.images, self.failures, self.seconds = 0, [], 0.0

    def process(self, index: int, record: ImageRecord, result, row: dict, size) -> None:
        self.images += 1
        if row["error"] is not None:
            self.failures.append({"image_id": row["image_id"], "path": row["path"], "error": row["error"]})

    def finish(self) -> None:
        self.seconds = time.time() - self.start

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


__all__ = ["Pictures", "Progress", "SLOW_IMAGE_S", "Timing", "first_box_hit"]
