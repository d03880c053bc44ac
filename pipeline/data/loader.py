"""Torch Dataset for mining: decode, normalise and pad one image per item; errors are returned."""
from __future__ import annotations

import torch

from pipeline.data.errors import ImageLoadError
from pipeline.data.images import load_image
from pipeline.data.records import ImageRecord


class MiningImages(torch.utils.data.Dataset):
    """Items ``{"index", "record", "image", "size", "error"}`` for ``records[indices[i]]``.

    ``index`` is the position in ``records``; ``image`` is ``preprocess_image``'s (3, Hp, Wp) tensor
    (ImageNet-normalised, zero-padded to a multiple of ``patch_size``) and ``size`` the unpadded
    (H, W). A file that cannot be used (ImageLoadError, e.g. corrupt, or smaller than one patch)
    gives ``image=None, size=None`` and the message in ``error``, so one bad image never kills a
    DataLoader worker.
    """

    def __init__(self, records: list[ImageRecord], patch_size: int, indices: list[int] | None = None):
        from pipeline.backbones import preprocess_image  # fail here, loudly, not inside a worker

        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.records = list(records)
        self.patch_size = int(patch_size)
        self.indices = list(range(len(self.records))) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(self.records)]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for {len(self.records)} records")
        self._preprocess = preprocess_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        rec = self.records[index]
        item = {"index": index, "record": rec, "image": None, "size": None, "error": None}
        try:
            img = load_image(rec.path, min_size=self.patch_size)
        except ImageLoadError as e:
            item["error"] = str(e)
            return item
        tensor, size = self._preprocess(img, self.patch_size)
        item["image"], item["size"] = tensor, (int(size[0]), int(size[1]))
        return item


def collate_single(batch: list[dict]) -> dict:
    """Collate for ``batch_size=1``: the item itself (no batch dimension added, None kept)."""
    if len(batch) != 1:
        raise ValueError(f"collate_single expects batch_size=1, got a batch of {len(batch)}")
    return batch[0]


def collate_list(batch: list[dict]) -> list[dict]:
    """Collate for ``batch_size=B``: the items as a list (images keep their own sizes; errors kept), for
    ``Backbone.features_batch``, which groups them by size itself."""
    return list(batch)
