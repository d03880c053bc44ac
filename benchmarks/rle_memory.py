"""Memory of pseudo-masks as compressed RLE at COCO20k scale (19,817 images x 3 objects, MaskCut's default).

Masks are what the miners make: patch-block masks (patch 16 on a 480 x 640 image: a 30 x 40 grid) of one or a
few connected blobs, at the image's size. Measures the RLE text per mask, the Python memory of every image's
RLE list (tracemalloc), the pseudo_boxes.json bytes they add, and what dense bool arrays would take instead.

    .venv/bin/python benchmarks/rle_memory.py [--images 19817] [--objects 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.masks import encode_rle, patch_mask_to_pixels  # noqa: E402


def blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A union of 1-3 random rectangles on an (h, w) patch grid."""
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        m[y0:y0 + int(rng.integers(2, h // 2)), x0:x0 + int(rng.integers(2, w // 2))] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=19817)
    ap.add_argument("--objects", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    H, W, p = 480, 640, 16
    t0 = time.perf_counter()
    tracemalloc.start()
    rows = [[encode_rle(patch_mask_to_pixels(blob(rng, H // p, W // p), p, (H, W))) for _ in range(args.objects)]
            for _ in range(args.images)]
    _, peak = tracemalloc.get_traced_memory()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    seconds = time.perf_counter() - t0
    n = args.images * args.objects
    text = sum(len(r["counts"]) for row in rows for r in row)
    json_bytes = sum(len(json.dumps(r)) for row in rows for r in row)
    dense = n * H * W  # one byte per pixel as numpy bool
    print(f"{args.images} images x {args.objects} masks ({H} x {W}, patch {p}): {n} masks encoded in {seconds:.1f} s")
    print(f"RLE text {text / n:.0f} chars per mask; held in memory {held / 2**20:.1f} MiB "
          f"(peak {peak / 2**20:.1f} MiB); in pseudo_boxes.json {json_bytes / 2**20:.1f} MiB")
    print(f"dense bool arrays instead: {dense / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
