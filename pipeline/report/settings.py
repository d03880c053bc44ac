"""What the HTML report of a dataset/backbone shows (:class:`ReportSettings`; the page is always rebuilt)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import Settings


@dataclass
class ReportSettings(Settings):
    max_pictures: int = 12    # mining pictures of the first N images (from the mine folders' viz/)
    worst: int = 4            # plus this many of the worst images (lowest IoU with GT), drawn for the report
