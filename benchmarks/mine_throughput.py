"""LOST mining throughput: images/s and peak memory for a backbone on the VOC07 fixture.

    .venv/bin/python benchmarks/mine_throughput.py [--arch dino_vits16] [--images 60] [--device auto]

Throughput does not depend on the weights, so random weights are used when none are given.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backbones import build_backbone  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.journal import Journal  # noqa: E402
from pipeline.mining import mine_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dino_vits16")
    shared = Path(os.environ.get("LOST_SHARED_DATA") or REPO / "tests" / "data") / "voc07-mini"
    ap.add_argument("--data", default=str(shared if shared.is_dir() else REPO / "tests" / "data" / "voc07-mini"))
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dataset = build_dataset("voc07", args.data, max_images=args.images)
    backbone = build_backbone(args.arch, init="pretrained" if args.weights else "random", weights=args.weights,
                              device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "bench.jsonl", {"bench": True})
        # warm-up on the first image, then time the rest
        mine_images(dataset, backbone, miner="lost", miner_params={"k_patches": 100}, feature="k",
                    journal=journal, num_workers=0, device=device, progress=False, shard=0,
                    num_shards=len(dataset))
        t = time.time()
        run = mine_images(dataset, backbone, miner="lost", miner_params={"k_patches": 100}, feature="k",
                          journal=journal, num_workers=args.workers, device=device, progress=True)
        wall = time.time() - t
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"arch={args.arch} device={device} images={run.computed} threads={torch.get_num_threads()} "
          f"weights={'given' if args.weights else 'random (throughput only; weights do not change it)'}")
    print(f"throughput: {run.computed / wall:.2f} images/s (wall {wall:.1f} s, incl. decoding)")
    print(f"peak host memory (max RSS): {rss_gib:.2f} GiB")
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
