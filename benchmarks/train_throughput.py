"""Training throughput (images/s) and peak memory of each detector preset.

Times full training steps (forward, backward, SGD step; AMP on CUDA unless --no-amp) on synthetic
in-memory images of a fixed size, after warm-up steps, so data loading is not measured. Random
weights: speed does not depend on them. Examples::

    python benchmarks/train_throughput.py                       # every preset, CUDA if present
    python benchmarks/train_throughput.py --presets mobilenet_fpn --device cpu --size 320 --batch 2
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.detection.builders import PRESETS, build_detector  # noqa: E402
from pipeline.detection.settings import DetectorSettings  # noqa: E402
from pipeline.detection.trainer import param_groups  # noqa: E402


def bench(preset: str, device: torch.device, batch: int, size: int, iters: int, warmup: int, amp: bool) -> dict:
    model = build_detector(preset, 1, min_size=size, max_size=int(size * 1333 / 800)).to(device).train()
    opt = torch.optim.SGD(param_groups(model, 1e-4, 0.0), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    g = torch.Generator().manual_seed(0)
    h, w = size, int(size * 4 / 3)
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch)]
    boxes = torch.tensor([[w * 0.1, h * 0.2, w * 0.6, h * 0.9], [w * 0.5, h * 0.1, w * 0.9, h * 0.5]], device=device)
    masks = torch.zeros(2, h, w, dtype=torch.uint8, device=device)  # the mask presets: each box filled
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        m[y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64, device=device),
                **({"masks": masks} if DetectorSettings(preset).masks else {})} for _ in range(batch)]

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "images_per_s": batch * iters / dt, "sec_per_iter": dt / iters, "peak_gib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--size", type=int, default=None, help="shorter side (default 800 on CUDA, 320 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (AMP is the trainer's default)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    batch, size = a.batch or (8 if cuda else 2), a.size or (800 if cuda else 320)
    iters, warmup = a.iters or (20 if cuda else 3), a.warmup if a.warmup is not None else (5 if cuda else 1)
    amp = cuda and not a.no_amp
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {batch}, images {size}x{int(size * 4 / 3)}, {iters} timed steps after {warmup}, "
          f"amp={amp}")
    print(f"{'preset':<27}{'images/s':>10}{'s/iter':>10}{'peak GiB':>10}")
    for preset in a.presets:
        r = bench(preset, device, batch, size, iters, warmup, amp)
        print(f"{r['preset']:<27}{r['images_per_s']:>10.2f}{r['sec_per_iter']:>10.3f}{r['peak_gib']:>10.2f}", flush=True)
    if not cuda:
        print("(CPU peak memory is the process's maximum resident set size, cumulative over presets)")


if __name__ == "__main__":
    main()
