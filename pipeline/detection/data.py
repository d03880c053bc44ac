"""Training data for the detector: a COCO json of (pseudo-)boxes + an image root -> torch samples.

:class:`DetectionDataset` reads ``pseudo_boxes.json`` / ``pseudo_labels.json`` (or any COCO dataset),
checks everything once at construction and keeps only what can be trained on:

- boxes (COCO ``bbox`` xywh) become xyxy, clipped to the image; degenerate ones (non-finite, width
  or height < ``min_box_size``, or fully outside the image) are dropped and counted;
- images missing on disk, unreadable, or whose size differs from the json are skipped with one
  warning listing them; images left without any box are skipped (detectron2's
  ``FILTER_EMPTY_ANNOTATIONS``); if nothing is left, a ``ValueError`` names the file;
- category ids map to contiguous labels 1..K in ascending id order (``class_agnostic=True``: all 1).

Masks (COCO ``segmentation``: RLE or polygons) are checked whenever a file has them (size, counts, polygons of
at least three points, images that exist: a ``ValueError`` naming the annotation); with ``masks=True`` (a Mask
R-CNN preset) every kept box must have one and samples carry ``"masks": (n, H, W) uint8``, kept as compressed
RLE until a sample is read.

Samples are ``(image float CHW in 0..1, {"boxes": (n, 4) float32 xyxy, "labels": (n,) int64,
"image_id": int, "scores": (n,) float32 (the annotations' ``score``, 1.0 without)[, "masks"]})``. The index may be ``(i, flip)``: the sampler decides the horizontal flip, so
augmentation is a pure function of the sampling seed (exact resume, worker-independent).
:class:`InfiniteSampler` yields that stream.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image

from pipeline.artifacts import ArtifactError, read_coco_boxes
from pipeline.boxes import clip_boxes, valid_boxes, xywh_to_xyxy
from pipeline.data.images import decode_chw_float as load_image
from pipeline.data.paths import resolve_image_path
from pipeline.masks import decode_rle, segmentation_problem, to_rle

STAT_KEYS = ("images_used", "boxes_used", "images_missing", "images_size_mismatch", "images_without_boxes",
             "boxes_degenerate", "boxes_clipped", "boxes_unknown_category", "boxes_on_unknown_images")
MAKER_HINT = "It is written by the mine stage (pseudo_boxes.json) or the cluster stage (pseudo_labels.json)."


class DetectionDataset(torch.utils.data.Dataset):
    """Validated detector training set; see the module docstring. ``stats`` counts what was dropped."""

    def __init__(self, coco: str | os.PathLike | dict, image_root: str | os.PathLike | None, *,
                 class_agnostic: bool = False, min_box_size: float = 1.0, what: str = "pseudo-box file",
                 hint: str = MAKER_HINT, masks: bool = False):
        """``hint``: what the user can do about a missing or empty file (the stage names its own keys);
        ``masks``: train masks (every box needs one; :class:`MasksMissing` when the file has none)."""
        self.source = str(coco) if not isinstance(coco, dict) else "<in-memory COCO dataset>"
        data = coco if isinstance(coco, dict) else read_coco_boxes(coco, what, hint)
        if not data.get("images") or not data.get("annotations"):
            raise ValueError(f"{what} {self.source} is empty ({len(data.get('images', []))} images, "
                             f"{len(data.get('annotations', []))} boxes): nothing to train on. {hint}")
        cats = sorted(int(c["id"]) for c in data.get("categories") or [{"id": 1}])
        self.category_ids = [1] if class_agnostic else cats
        self.category_names = ["object"] if class_agnostic else [
            next(str(c.get("name", c["id"])) for c in data["categories"] if int(c["id"]) == i) for i in cats]
        label_of = {c: (1 if class_agnostic else k + 1) for k, c in enumerate(cats)}
        self.stats: Counter = Counter(dict.fromkeys(STAT_KEYS, 0))
        self.missing_images: list[str] = []
        self.masks = bool(masks)
        check_masks(data, what, self.source, need=self.masks)
        by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        self.entries: list[dict] = []
        seen = set()
        for img in data["images"]:
            iid = int(img["id"])
            if iid in seen:
                raise ValueError(f"{what} {self.source}: image id {iid} appears twice in 'images'")
            seen.add(iid)
            entry = self._entry(img, by_image.get(iid, []), image_root, label_of, min_box_size)
            if entry is not None:
                self.entries.append(entry)
        orphans = set(by_image) - seen
        self.stats["boxes_on_unknown_images"] = sum(len(by_image[i]) for i in orphans)
        self.stats["images_used"] = len(self.entries)
        self.stats["boxes_used"] = sum(len(e["boxes"]) for e in self.entries)
        if self.missing_images:
            shown = ", ".join(self.missing_images[:5]) + (" ..." if len(self.missing_images) > 5 else "")
            warnings.warn(f"{what} {self.source}: {len(self.missing_images)} image(s) missing or unreadable under "
                          f"image root {image_root}, skipped: {shown}", stacklevel=2)
        if not self.entries:
            raise ValueError(f"{what} {self.source}: no trainable image left ({dict(self.stats)}); check the image "
                             f"root ({image_root}) and the boxes. {MAKER_HINT}")

    def _entry(self, img: dict, anns: list[dict], image_root, label_of, min_box_size) -> dict | None:
        path = resolve_image_path(str(img.get("file_name", "")), image_root)
        try:
            with Image.open(path) as im:
                size = im.size
        except (OSError, ValueError):
            self.stats["images_missing"] += 1
            self.missing_images.append(str(path))
            return None
        w, h = int(img.get("width") or size[0]), int(img.get("height") or size[1])
        if (w, h) != tuple(size):
            self.stats["images_size_mismatch"] += 1
            self.missing_images.append(f"{path} (json says {w}x{h}, file is {size[0]}x{size[1]})")
            return None
        known = [a for a in anns if int(a.get("category_id", 1)) in label_of]
        self.stats["boxes_unknown_category"] += len(anns) - len(known)
        xyxy = xywh_to_xyxy([a["bbox"] for a in known]) if known else np.zeros((0, 4))
        ok = valid_boxes(xyxy, w, h, min_box_size)
        self.stats["boxes_degenerate"] += int((~ok).sum())
        clipped = clip_boxes(xyxy[ok], w, h)
        keep = valid_boxes(clipped, w, h, min_box_size)  # clipping can shrink a sliver below min size
        self.stats["boxes_degenerate"] += int((~keep).sum())
        self.stats["boxes_clipped"] += int(((np.abs(clipped - xyxy[ok]) > 1e-9).any(axis=1) & keep).sum())
        if not keep.any():
            self.stats["images_without_boxes"] += 1
            return None
        kept = [a for a, k in zip([a for a, k in zip(known, ok) if k], keep) if k]
        entry = {"image_id": int(img["id"]), "path": str(path), "width": w, "height": h,
                 "boxes": clipped[keep].astype(np.float32),
                 "labels": np.array([label_of[int(a.get("category_id", 1))] for a in kept], dtype=np.int64),
                 # each pseudo-box's score (VoteCut's soft target; 1.0 when the file has none): score_weighting
                 "scores": np.array([float(a.get("score", 1.0)) for a in kept], dtype=np.float32)}
        if self.masks:
            entry["masks"] = [to_rle(a["segmentation"], h, w) for a in kept]
        return entry

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        i, flip = key[:2] if isinstance(key, tuple) else (key, False)  # (i, flip[, epoch]): the sampler's key
        e = self.entries[int(i)]
        image = load_image(e["path"])
        boxes = torch.from_numpy(e["boxes"].copy())
        target = {"labels": torch.from_numpy(e["labels"].copy()), "image_id": e["image_id"],
                  "scores": torch.from_numpy(e["scores"].copy())}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([decode_rle(m) for m in e["masks"]]).astype(np.uint8))
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([e["width"] - boxes[:, 2], boxes[:, 1], e["width"] - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, {"boxes": boxes, **target}


class MasksMissing(ArtifactError):
    """A mask detector was asked to train on a file without masks (the caller says which settings give them)."""


def check_masks(data: dict, what: str, source: str, *, need: bool) -> None:
    """Every ``segmentation`` of the COCO dict ``data`` usable (:func:`pipeline.masks.segmentation_problem` at
    its image's size, on an image of the file), else a ValueError naming the first bad annotation; with
    ``need``, every annotation has one (:class:`MasksMissing` when none has)."""
    sizes = {int(im["id"]): (im.get("height"), im.get("width")) for im in data["images"]}
    with_masks = 0
    for a in data["annotations"]:
        seg = a.get("segmentation")
        if seg is None or seg == []:
            continue
        with_masks += 1
        if int(a["image_id"]) not in sizes:
            raise ValueError(f"{what} {source}: annotation {a.get('id')} has a mask of image {a['image_id']}, which "
                             "is not in the file's images; nothing is trained from it")
        h, w = sizes[int(a["image_id"])]
        problem = segmentation_problem(seg, int(h or 0), int(w or 0)) if h and w else None
        if problem:
            raise ValueError(f"{what} {source}: annotation {a.get('id')} (image {a['image_id']}): its segmentation "
                             f"is {problem}; nothing is trained from it")
    if need and not with_masks:
        raise MasksMissing(f"{what} {source} has no masks (no annotation has a 'segmentation'): a mask detector "
                           "trains on pseudo-masks, which every miner writes (a file mined before masks existed has "
                           "none)")
    if need and with_masks < len(data["annotations"]):
        missing = next(a.get("id") for a in data["annotations"] if a.get("segmentation") in (None, []))
        raise ValueError(f"{what} {source}: annotation {missing} has no mask (segmentation) but others do: a mask "
                         "detector needs the mask of every box; nothing is trained from it")


def collate(batch):
    """Lists of images and targets, as torchvision's detection models take them."""
    return [b[0] for b in batch], [b[1] for b in batch]


def epoch_order(n: int, seed: int, epoch: int, flip: bool) -> list[tuple[int, bool, int]]:
    """The (index, flip, epoch) order of one epoch: a pure function of (seed, epoch). The epoch lets an
    augmentation seeded by the key (copy-paste) draw afresh every epoch, still exactly on resume."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    flips = rng.random(n) < 0.5
    return [(int(i), bool(f) and flip, int(epoch)) for i, f in zip(perm, flips)]


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless (index, flip, epoch) stream for iteration-based training.

    The global stream concatenates :func:`epoch_order` for epochs 0, 1, ...; it starts at global
    position ``start`` (``iteration * global batch`` when resuming) and rank ``r`` of ``world_size``
    takes positions ``start + r``, ``start + r + world_size``, ... (a DistributedSampler-style shard).
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1, flip: bool = True):
        if n <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.n, self.seed, self.start, self.rank, self.world, self.flip = n, seed, start, rank, world_size, flip

    def __iter__(self):
        pos = self.start + self.rank
        epoch, order = -1, []
        while True:
            e = pos // self.n
            if e != epoch:
                epoch, order = e, epoch_order(self.n, self.seed, e, self.flip)
            yield order[pos % self.n]
            pos += self.world


class TrainLoader:
    """The training batches of this process (built once, like any loader; iterated from an iteration, which
    makes a resume exact): an endless :class:`InfiniteSampler` over ``dataset`` seeded by ``seed``, this
    rank's share ``batch_size // world`` of the global ``batch_size``. Build it with
    :func:`pipeline.detection.trainer.build_train_loader`."""

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, flip: bool = True, pin_memory: bool = False) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes; "
                             "change it or --nproc_per_node")
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, int(batch_size), int(seed), rank, world
        self.num_workers, self.flip, self.pin_memory = int(num_workers), bool(flip), bool(pin_memory)

    def loader(self, start_iteration: int = 0) -> torch.utils.data.DataLoader:
        """The DataLoader whose first batch is that of iteration ``start_iteration``."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size // self.world,
            sampler=InfiniteSampler(len(self.dataset), self.seed, start_iteration * self.batch_size, self.rank,
                                    self.world, self.flip),
            num_workers=self.num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(self.seed),
            pin_memory=self.pin_memory)
