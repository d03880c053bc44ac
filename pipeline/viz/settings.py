"""Which pictures the stages draw (:class:`VizSettings`): report settings only, changing them never recomputes
an artifact."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import Settings


@dataclass
class VizSettings(Settings):
    num_images: int = 12      # pictures of the first N images (mining: seed/expansion/box; detectors: top box)
    contact_sheet: int = 12   # mining: contact sheet of the first N pictures (0: none)
    min_score: float = 0.3    # detectors: draw the detections scoring at least this (the top one always)
    gallery_size: int = 16    # cluster: crops per cluster gallery
    thumb: int = 96           # cluster: thumbnail size (px)

    def rules(self) -> list[tuple[str, bool, str]]:
        counts = ("num_images", "contact_sheet", "gallery_size", "thumb")
        return [(name, getattr(self, name) >= 0, "must be >= 0") for name in counts]
