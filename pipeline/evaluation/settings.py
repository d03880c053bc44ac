"""How detectors are scored (:class:`EvalSettings`): report settings only, changing them never retrains."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import Settings, choose

VOC_DIFFICULT = ("remove", "ignore")


@dataclass
class EvalSettings(Settings):
    enabled: bool = True           # after training: detections on the training images + CorLoc/AP when GT exists
    batch_size: int = 2            # images per inference batch (every stage that runs a detector)
    voc_difficult: str = "remove"  # VOC AP: remove difficult objects from the GT (LOST's evaluation) | ignore

    def rules(self) -> list[tuple[str, bool, str]]:
        return [("batch_size", self.batch_size >= 1, "must be >= 1"),
                ("voc_difficult", self.voc_difficult in VOC_DIFFICULT, choose(VOC_DIFFICULT))]
