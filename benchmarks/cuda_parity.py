"""CUDA vs CPU agreement of LOST seeds and boxes on the VOC07 fixture (random weights unless given).

    .venv/bin/python benchmarks/cuda_parity.py [--images 60] [--batch 16] [--precisions fp32 bf16 fp16]

The CPU float32 path, one image at a time, is the reference (the exact path). Each CUDA run uses
``Backbone.features_batch`` (grouped by size, ``--batch`` per forward) and ``lost_batch`` on the
GPU. Printed per precision: identical boxes, identical seeds, boxes with IoU >= 0.5 to the CPU box,
and the largest key difference. float32 on CUDA is expected to agree almost everywhere but not
bit-wise (different GEMM kernels); bf16/fp16 are reported, not promised.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backbones import build_backbone  # noqa: E402
from pipeline.data import MiningImages, build_dataset  # noqa: E402
from pipeline.discovery import lost  # noqa: E402
from pipeline.discovery import build_miner  # noqa: E402


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dino_vits16")
    ap.add_argument("--data", default=os.environ.get("LOST_SHARED_DATA", str(REPO.parent / "shared" / "data"))
                    + "/voc07-mini")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--weights", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_parity: no CUDA device; nothing to compare")
        return 2
    init = "pretrained" if a.weights else "random"
    ds = build_dataset("voc07", a.data, max_images=a.images)
    cpu = build_backbone(a.arch, init=init, weights=a.weights, device="cpu")
    items = [x for x in MiningImages(ds.records, cpu.patch_size) if x["error"] is None]
    ref = []
    for x in items:
        out = cpu.features(x["image"][None])
        ref.append((out.feats, lost(out.feats[0], out.dims, cpu.patch_size, x["size"])))
    print(f"{a.arch} ({init} weights), {len(items)} images; reference: CPU float32, one image at a time")
    print(f"{'precision':<10}{'same box':>10}{'same seed':>11}{'IoU>=0.5':>10}{'max |dk|':>12}")
    for p in a.precisions:
        gpu = build_backbone(a.arch, init=init, weights=a.weights, device="cuda", precision=p)
        same_box = same_seed = close = 0
        max_dk = 0.0
        for s in range(0, len(items), a.batch):
            chunk = items[s:s + a.batch]
            outs = gpu.features_batch([x["image"] for x in chunk], max_batch=a.batch)
            res = build_miner("lost", gpu.patch_size).mine_batch(outs, [x["size"] for x in chunk])
            for j, (o, r) in enumerate(zip(outs, res)):
                feats_ref, lost_ref = ref[s + j]
                max_dk = max(max_dk, float((o.feats.cpu() - feats_ref).abs().max()))
                same_box += r.box.tolist() == lost_ref.box.tolist()
                same_seed += r.seed == lost_ref.seed
                close += iou(r.box, lost_ref.box) >= 0.5
        n = len(items)
        print(f"{p:<10}{same_box:>6}/{n:<3}{same_seed:>7}/{n:<3}{close:>6}/{n:<3}{max_dk:>12.2e}", flush=True)
        del gpu
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
