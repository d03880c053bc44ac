"""How any stage runs (the top level of the config): its device, DataLoader workers, progress bars, whether
finished results are replaced, and the training seed (:class:`RunSettings`). The device is resolved by
:func:`pipeline.runtime.resolve_device`."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.settings import Settings


@dataclass
class RunSettings(Settings):
    device: str = "auto"     # auto | cpu | cuda | cuda:1 (under torchrun: cuda:LOCAL_RANK)
    num_workers: int = 2     # DataLoader workers (image decoding)
    progress: bool = True    # progress bars
    force: bool = False      # true (make FORCE=1): redo a stage whose results exist, replacing them
    seed: int = 0            # detector training: sampling order, flips and random initialisation

    def rules(self) -> list[tuple[str, bool, str]]:
        return [("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
                 "not a device; use device=auto, cpu, cuda or cuda:N")]
