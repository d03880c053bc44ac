"""How much memory training a detector preset needs, to stop early (before minutes of set-up and a silent
kill by the kernel) when the device obviously cannot hold it.

Measured with ``benchmarks/train_throughput.py`` on a CPU in float32 (2026-11-30, torch 2.14, random
weights, two SGD steps, peak resident memory): r50_c4 1 image at 480 px 4.9 GiB, 2 images at 800 px
10.4 GiB; r50_fpn 2 images at 800 px 5.8 GiB; mobilenet_fpn 2 images at 800 px 3.1 GiB. Per training
image r50_c4 needs a part that does not depend on the image size (its res5 box head runs on every sampled
RoI: 512 per image at 14x14) and a part that grows with the pixels; the fit below reproduces those
measurements. On a GPU with AMP the need is roughly half (activations in float16); the estimate is meant
to catch an impossible setting (the default 16-image schedule on one CPU needs ~70 GiB), not to budget.
The Mask R-CNN presets count as their box presets (their mask head is not measured yet), and so do the Cascade
Mask R-CNN presets (``cascade_mask_r50_fpn`` as ``r50_fpn``: not measured; its two extra box stages run on the same
sampled RoIs, so it needs somewhat more).
"""
from __future__ import annotations

import os

#: GiB per training image: (fixed, per (short side / 800)^2) at batch_size_per_image=512, float32
PER_IMAGE_GIB = {"r50_c4": (2.8, 1.6), "r50_fpn": (0.6, 1.5), "mobilenet_fpn": (0.2, 0.6)}
BASE_GIB = 1.5   # the process, torch, the model, its gradients and the optimizer state


def estimate_train_gib(preset: str, images: int, short_side: int, rois_per_image: int = 512,
                       amp: bool = False) -> float:
    """Estimated peak memory (GiB) of training ``preset`` on ``images`` images per step at ``short_side``."""
    base = preset.removeprefix("cascade_").removeprefix("mask_")  # not measured: counted as the box preset
    fixed, per_pixel = PER_IMAGE_GIB.get(base, PER_IMAGE_GIB["r50_fpn"])
    per_image = fixed * (rois_per_image / 512) + per_pixel * (short_side / 800) ** 2
    return BASE_GIB + images * per_image * (0.5 if amp else 1.0)


def available_gib(device: str) -> float | None:
    """Free memory of ``device`` (GiB): the GPU's free memory, or the host's MemAvailable; None if unknown."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def check_train_memory(preset: str, images: int, short_side: int, device: str, *, rois_per_image: int = 512,
                       amp: bool = False, margin: float = 1.5) -> str | None:
    """A message when the estimate exceeds ``margin`` times the free memory of ``device`` (obviously too
    much), else None. The caller adds what to change (its own settings' names)."""
    need = estimate_train_gib(preset, images, short_side, rois_per_image, amp)
    have = available_gib(device)
    if have is None or need <= margin * have:
        return None
    return (f"training {preset} with {images} images per step at {short_side} px needs about {need:.0f} GiB on "
            f"{device}, which has {have:.0f} GiB free")
