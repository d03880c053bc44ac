"""How a mining run is split and batched (:class:`MineSettings`; the run itself is :mod:`pipeline.mining`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.settings import Settings


@dataclass
class MineSettings(Settings):
    shard: int = 0                       # this job mines images shard, shard + num_shards, ...
    num_shards: int = 1
    # images per backbone batch (grouped by size); None: 1 on a CPU (exact), 16 on a GPU
    batch_size: Optional[int] = None
    # on a CPU: worker processes with one thread each; None: one per core (Linux: forked, start at once; else
    # spawned, only on >= 4 cores)
    procs: Optional[int] = None
    merge: bool = True                   # write pseudo_boxes.json once every shard of the run is complete
    merge_only: bool = False             # only merge finished shards (make merge)

    def rules(self) -> list[tuple[str, bool, str]]:
        n, shard = self.num_shards, self.shard
        optional = "must be >= 1 (or None for the default)"
        return [("num_shards", n >= 1, "must be >= 1"),
                ("shard", n < 1 or 0 <= shard < n, f"must be in [0, `num_shards`) = [0, {n - 1}]"),
                ("batch_size", self.batch_size is None or self.batch_size >= 1, optional),
                ("procs", self.procs is None or self.procs >= 1, optional)]
