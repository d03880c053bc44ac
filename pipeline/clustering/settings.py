"""The clustering settings with their defaults, in one place (the cluster stage's config schema extends this
class with where the boxes come from: ``stages/config.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.settings import Settings


@dataclass
class ClusteringSettings(Settings):
    """How box crops become pseudo-labels (the values LOST's reference uses unless said otherwise)."""

    k: int = 20                      # clusters: 20 for VOC, 80 for COCO (as LOST)
    seed: int = 0                    # K-means restart i uses seed + i
    n_init: int = 10                 # K-means restarts, the lowest inertia wins
    iters: int = 20                  # Lloyd iterations per restart
    whiten: bool = True              # divide each dimension by its std (as the reference)
    l2_normalize: bool = True        # L2-normalise before and after whitening (as the reference)
    batch_size: int = 32             # crops per forward pass (crops of equal shape are batched)
    short_side: int = 256            # crops resized so their shorter side is this (bicubic), as the reference
    # cap on the longer side of a resized crop: a 400x17 box would be 6023 px long and take a minute to
    # embed; only boxes longer than 4:1 are affected. None: no cap, as the reference
    max_size: Optional[int] = 1024

    def rules(self) -> list[tuple[str, bool, str]]:
        counts = ("k", "n_init", "iters", "batch_size", "short_side")
        return [*((name, getattr(self, name) >= 1, "must be >= 1") for name in counts),
                ("max_size", self.max_size is None or self.max_size >= self.short_side,
                 f"must be >= `short_side` ({self.short_side}) or None")]
