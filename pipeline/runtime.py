"""Where and how a run executes: the device, its wall clock, the random-weights banner, and the distributed
environment of a SLURM job. Plain parameters; the stages pass the configured values."""
from __future__ import annotations

import os
import re
import sys
import time

RANDOM_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  {what} USES RANDOMLY INITIALISED WEIGHTS ({reason}).
!!  Boxes, clusters and every number below are a smoke test of the code, NOT a
!!  result. For real results provide the DINO weights (see README, "Weights").
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def warn_random(what: str, reason: str) -> None:
    """The banner on stderr: what uses random weights and why (``reason`` names the setting)."""
    print(RANDOM_BANNER.format(what=what.upper(), reason=reason), file=sys.stderr, flush=True)


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


def resolve_device(name: str) -> str:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or a CUDA device
    that is not visible, is a ValueError naming the choices."""
    import torch

    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device={name} is not a device: use device=auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} requested but no CUDA device is visible. Use device=cpu.")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return name


def export_submitit_distributed_env() -> None:
    """Inside a multi-task submitit job (a SLURM launcher with several tasks per node), export the
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT that torch's ``env://`` initialisation (and torchrun)
    use, so one code path serves torchrun and SLURM."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
