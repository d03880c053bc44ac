"""Attention in blocks of query rows (CPU): time and peak memory of one forward, blocked vs one product.

    .venv/bin/python benchmarks/attention_blocks.py                          # ViT-S/16 on VOC-sized, ViT-S/8 on 1024 px
    .venv/bin/python benchmarks/attention_blocks.py --arch dino_vits8 --size 1024 1024 --row-block 0 256

Each setting runs in a fresh process (peak RSS is per process): random weights, one warm-up forward, then
the mean of ``--repeat`` timed forwards of the last-block keys, and the process's peak resident memory.
The keys of every setting are compared bit for bit with the first one (blocking must not change them).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(arch: str, h: int, w: int, row_block: int, repeat: int, out: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.backbones import build_backbone

    backbone = build_backbone(arch, init="random", seed=0)
    for blk in backbone.model.blocks:
        blk.attn.row_block = row_block
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    feats = backbone.features(x).feats  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        backbone.features(x)
    torch.save(feats, out)
    print(json.dumps({"s": (time.perf_counter() - t0) / repeat,
                      "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=None)
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--row-block", type=int, nargs="+", default=[0, 256], help="0: one product (no blocks)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        arch, h, w, rb, out = args.one
        return one(arch, int(h), int(w), int(rb), args.repeat, out)
    cases = [(args.arch, *args.size)] if args.arch and args.size else \
        [("dino_vits16", 384, 512), ("dino_vits8", 1024, 1024)]
    import tempfile

    import torch

    print(f"{'arch':<12}{'image':>11}{'tokens':>8}{'row_block':>10}{'s/forward':>11}{'peak RSS GiB':>14}  keys")
    for arch, h, w in cases:
        p = 8 if arch.endswith("8") else 16
        ref = None
        with tempfile.TemporaryDirectory() as tmp:
            for rb in args.row_block:
                out = f"{tmp}/{rb}.pt"
                proc = subprocess.run([sys.executable, __file__, "--repeat", str(args.repeat), "--one", arch, str(h),
                                       str(w), str(rb), out], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{arch:<12}{h}x{w:>6}{'':>8}{rb:>10}  failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                feats = torch.load(out)
                ref = feats if ref is None else ref
                same = "identical" if torch.equal(feats, ref) else "DIFFER"
                print(f"{arch:<12}{f'{h}x{w}':>11}{(h // p) * (w // p) + 1:>8}{rb:>10}{res['s']:>11.2f}"
                      f"{res['rss_gib']:>14.2f}  {same}")


if __name__ == "__main__":
    main()
