"""The normalized cut's two solvers: speed at 3,600 tokens and agreement of boxes and masks.

    .venv/bin/python benchmarks/cut_solver.py                       # timing, synthetic and fixture agreement
    .venv/bin/python benchmarks/cut_solver.py --skip-fixture --repeats 3
    .venv/bin/python benchmarks/cut_solver.py --device cuda         # the torch solver on a GPU (gpu_check.sh)

(a) Timing, one graph of ``--side``² tokens (default 60 x 60 = 3,600: MaskCut at 480 x 480, patch 8) from
synthetic key-like features (``benchmarks/eigensolver.py``'s planted blob, 384 dims): the exact path
(``binary_graph`` + ``solve_cut``: scipy's generalized ``eigh(D - W, D, subset_by_index=[1, 2])``, one BLAS
thread as in mining) against ``solver="torch"`` (``binary_graph_torch`` + ``solve_cut_torch``, one torch
thread on a CPU as it pins), the solve alone and with the graph (the whole cut step), and for scale a dense
``torch.linalg.eigh`` of the normalized Laplacian in float64 and float32 (the torch solver's fallback is the
float64 one), one thread on a CPU. Then the solve alone on harder spectra: smoothed random fields (``--no-fields``
skips them). The methods alternate within each repeat (the machine's
load moves them alike); medians are printed.

(b) Agreement: the VOC07 fixture (``--images``, default 60) through a DINO ViT (``--arch``, default
dino_vits8) with **random weights** (the only weights here; they make a cluttered, texture-like graph, not
DINO's), every image resized to ``--size`` (480) as MaskCut's ``image_size``: TokenCut and MaskCut with
``solver="scipy"`` and ``"torch"`` on the same features. Also ``--synthetic`` images of planted objects (clear
objects on a background, noise). Printed: the share of identical boxes (by rank; a box missing on one side
counts as different), the mean IoU of the masks of the same rank, identical seeds and stop reasons, and the
median time of one cut of each solver. Features are cached with ``--cache FILE``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def med(ts) -> float:
    return float(np.median(ts))


def timing(side: int, dim: int, repeats: int, device: str, dense: bool) -> None:
    import torch

    from eigensolver import make_feats
    from pipeline.discovery.cut_solver import binary_graph_torch, solve_cut_torch
    from pipeline.discovery.tokencut import binary_graph, solve_cut

    threads = torch.get_num_threads()
    F = torch.from_numpy(make_feats(side, side, dim))
    Fd = F.to(device)
    n = side * side

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def exact():
        return solve_cut(binary_graph(F, 0.15, 1e-5))

    def fast():
        cut = solve_cut_torch(binary_graph_torch(Fd, 0.15, 1e-5))
        sync()
        return cut

    W = binary_graph(F, 0.15, 1e-5)
    Wd = torch.from_numpy(W).to(device)
    s = Wd.sum(1).rsqrt()
    L64 = torch.eye(n, dtype=torch.float64, device=device) - s[:, None] * Wd * s[None, :]
    L32 = L64.float()

    def dense(L):
        def run():
            torch.set_num_threads(1 if device == "cpu" else threads)
            try:
                out = torch.linalg.eigh(L)
                sync()
            finally:
                torch.set_num_threads(threads)
            return out
        return run

    dense64, dense32 = dense(L64), dense(L32)

    def exact_solve():
        return solve_cut(W)

    def fast_solve():
        cut = solve_cut_torch(Wd)
        sync()
        return cut

    fast()  # warm-up (CUDA context, kernels)
    runs: dict[str, tuple[list[float], str | None]] = {}
    cuts = {}
    where = "1 thread" if device == "cpu" else device
    for r in range(repeats):
        plan = [("exact solve: scipy eigh(D - W, D, subset_by_index=[1, 2]), 1 BLAS thread", exact_solve, None),
                (f"torch solve: solve_cut_torch ({where})", fast_solve, "exact solve"),
                ("exact cut step: binary_graph + solve_cut", exact, None),
                (f"torch cut step: binary_graph_torch + solve_cut_torch ({where})", fast, "exact cut step")]
        if dense and r < max(1, repeats // 2 + 1):
            plan += [(f"dense torch.linalg.eigh(L) float64 ({where})", dense64, "exact solve"),
                     (f"dense torch.linalg.eigh(L) float32 ({where})", dense32, "exact solve")]
        for name, fn, base in plan:
            t = time.perf_counter()
            out = fn()
            runs.setdefault(name, ([], base))[0].append(time.perf_counter() - t)
            cuts[fn.__name__] = out
    print(f"(a) one cut at {n} tokens ({side} x {side}, {dim}-dim synthetic features, tau 0.15), median of "
          f"{repeats} (dense: fewer); {os.cpu_count()} CPUs, torch {torch.__version__}; graphs built with {threads} "
          f"torch threads, solves on one thread on a CPU (both solvers pin it)")
    for name, (ts, base) in runs.items():
        ref_name = next((k for k in runs if k.startswith(base)), None) if base else None
        speed = f"{med(runs[ref_name][0]) / med(ts):6.1f}x vs {base}" if ref_name else ""
        print(f"  {name:<78} {med(ts):8.3f} s  {speed}  (n={len(ts)})")
    ref, fast_cut = cuts["exact"], cuts["fast"]
    err = np.abs(np.sign(fast_cut.v @ ref.v) * fast_cut.v - ref.v).max()
    print(f"  λ₂ exact {ref.eigvals[0]:.12f}, torch {fast_cut.eigvals[0]:.12f}; max |v_torch - v_exact| = {err:.1e}")


def field_timing(side: int, device: str) -> None:
    """Harder spectra than planted blobs: smoothed random fields (64 channels, Gaussian blur ``sigma`` patches,
    plus noise), whose graphs have many close small eigenvalues (a sparse graph at tau 0.5 is the worst case
    for a Krylov method). One solve each, the same graph for both solvers."""
    import scipy.ndimage
    import torch

    from pipeline.discovery.cut_solver import solve_cut_torch
    from pipeline.discovery.tokencut import binary_graph, orient, solve_cut

    print(f"  smoothed random fields, {side * side} tokens: solve only (the same W), scipy vs torch")
    rng = np.random.default_rng(0)
    for sigma in (1, 2, 4):
        X = np.stack([scipy.ndimage.gaussian_filter(x, sigma, mode="wrap") for x in rng.normal(size=(64, side, side))])
        X += 0.3 * X.std() * rng.normal(size=X.shape)
        F = torch.from_numpy(X.reshape(64, -1).T.copy()).float()
        for tau in (0.2, 0.5):
            W = binary_graph(F, tau, 1e-5)
            Wd = torch.from_numpy(W).to(device)
            t = time.perf_counter()
            exact = solve_cut(W)
            t_exact = time.perf_counter() - t
            t = time.perf_counter()
            fast = solve_cut_torch(Wd)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t_fast = time.perf_counter() - t
            (_, pe, se), (_, pf, sf) = orient(exact.v), orient(fast.v)
            print(f"    sigma {sigma} tau {tau}: density {float((W == 1).mean()):.3f}, λ₂ {exact.eigvals[0]:.4f}, "
                  f"λ₃ - λ₂ {exact.eigvals[1] - exact.eigvals[0]:.1e}; scipy {t_exact:.2f} s, torch {t_fast:.3f} s "
                  f"({t_exact / t_fast:.1f}x); same bipartition {bool((pe == pf).all())}, same seed {se == sf}",
                  flush=True)


def cmp_results(a, b) -> dict:
    """Agreement of two miner results of one image: boxes by rank, masks' IoU by rank, seed, stop."""
    k = max(len(a.boxes), len(b.boxes))
    same = sum(1 for i in range(min(len(a.boxes), len(b.boxes))) if a.boxes[i].tolist() == b.boxes[i].tolist())
    ious = []
    for i in range(k):
        if i >= len(a.masks) or i >= len(b.masks):
            ious.append(0.0)
            continue
        inter = np.logical_and(a.masks[i], b.masks[i]).sum()
        union = np.logical_or(a.masks[i], b.masks[i]).sum()
        ious.append(float(inter / union) if union else 1.0)
    return {"boxes": k, "same": same, "ious": ious, "seed": a.seeds == b.seeds, "stop": a.stop == b.stop}


class Tally:
    def __init__(self) -> None:
        self.boxes = self.same = self.images = self.seeds = self.stops = 0
        self.ious: list[float] = []
        self.t_exact: list[float] = []
        self.t_fast: list[float] = []
        self.worst: list[tuple] = []

    def add(self, name, c: dict) -> None:
        self.images += 1
        self.boxes += c["boxes"]
        self.same += c["same"]
        self.ious += c["ious"]
        self.seeds += c["seed"]
        self.stops += c["stop"]
        if c["same"] < c["boxes"]:
            self.worst.append((name, c["same"], c["boxes"], [round(x, 3) for x in c["ious"]]))

    def line(self, label: str) -> str:
        share = 100.0 * self.same / max(1, self.boxes)
        out = (f"  {label:<34} images {self.images:3d}  boxes {self.boxes:4d}  identical {self.same:4d} "
               f"({share:5.1f} %)  mean mask IoU {np.mean(self.ious) if self.ious else float('nan'):.4f}  "
               f"same seeds {self.seeds}/{self.images}  same stop {self.stops}/{self.images}")
        if self.t_exact:
            out += (f"\n  {'':<34} one cut: scipy {med(self.t_exact):.3f} s, torch {med(self.t_fast):.3f} s "
                    f"(median of {len(self.t_exact)} / {len(self.t_fast)} cuts; "
                    f"{med(self.t_exact) / med(self.t_fast):.1f}x)")
        for w in self.worst[:8]:
            out += f"\n    differs: {w[0]}: {w[1]}/{w[2]} boxes identical, mask IoU by rank {w[3]}"
        return out


def timed_solvers(tally: Tally):
    """Patch the two solvers as the miners see them to time every cut (the miners call ``graph_cut``)."""
    import pipeline.discovery.maskcut as mc
    import pipeline.discovery.tokencut as tc

    orig = tc.graph_cut

    def graph_cut(F, tau, eps, solver="scipy"):
        t = time.perf_counter()
        cut = orig(F, tau, eps, solver)
        (tally.t_fast if solver == "torch" else tally.t_exact).append(time.perf_counter() - t)
        return cut

    tc.graph_cut = graph_cut
    mc.graph_cut = graph_cut
    return lambda: (setattr(tc, "graph_cut", orig), setattr(mc, "graph_cut", orig))


def agreement(items, label: str, device: str, max_boxes: int = 1) -> None:
    """``items``: (name, feats (N, D), dims, patch, size). TokenCut and MaskCut, both solvers, one image at a
    time (the torch solve on ``device``)."""
    from pipeline.discovery.maskcut import maskcut
    from pipeline.discovery.tokencut import tokencut

    for miner, fn, params in (("tokencut", tokencut, {"tau": 0.2, "max_boxes": max_boxes}),
                              ("maskcut", maskcut, {"tau": 0.15, "num_objects": 3})):
        tally = Tally()
        restore = timed_solvers(tally)
        try:
            for name, F, dims, p, size in items:
                a = fn(F, dims, p, size, solver="scipy", **params)
                b = fn(F.to(device), dims, p, size, solver="torch", **params)
                tally.add(name, cmp_results(a, b))
        finally:
            restore()
        print(tally.line(f"{label} {miner}"), flush=True)


def fixture_items(arch: str, data: str, images: int, size: int, cache: str | None):
    import torch

    if cache and Path(cache).is_file():
        return torch.load(cache)
    from pipeline.backbones import build_backbone
    from pipeline.data import MiningImages, build_dataset

    ds = build_dataset("voc07", data, max_images=images)
    bb = build_backbone(arch, init="random", device="cpu")
    items = []
    for x in MiningImages(ds.records, bb.patch_size, square=size):
        if x["error"] is None:
            o = bb.features(x["image"][None])
            items.append((x["record"].image_id, o.feats[0].clone(), tuple(o.dims), bb.patch_size, tuple(x["size"])))
    if cache:
        torch.save(items, cache)
    return items


def synthetic_items(count: int, side: int, dim: int = 64):
    """Planted objects: 1-3 rectangles, each its own direction, on a background direction, plus noise."""
    import torch

    rng = np.random.default_rng(0)
    items = []
    for k in range(count):
        g = torch.Generator().manual_seed(k)
        objects = int(rng.integers(1, 4))
        dirs = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0][:, : objects + 1].T
        lab = torch.zeros(side, side, dtype=torch.long)
        for j in range(objects):
            hh, ww = int(rng.integers(side // 6, side // 2)), int(rng.integers(side // 6, side // 2))
            y0, x0 = int(rng.integers(0, side - hh)), int(rng.integers(0, side - ww))
            lab[y0:y0 + hh, x0:x0 + ww] = j + 1
        noise = float(rng.choice([0.3, 0.5, 0.7]))
        F = (dirs[lab.flatten()] + noise * torch.randn(side * side, dim, generator=g, dtype=torch.float64)).float()
        items.append((f"synthetic-{k}", F, (side, side), 8, (side * 8, side * 8)))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=60, help="timing graph: side x side tokens (60: 3,600)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense torch.linalg.eigh timings")
    ap.add_argument("--device", default="cpu", help="where the torch solver runs (cpu, cuda)")
    ap.add_argument("--arch", default="dino_vits8")
    ap.add_argument("--data", default=str(REPO / "tests" / "data" / "voc07-mini"))
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--size", type=int, default=480, help="the square the fixture images are resized to")
    ap.add_argument("--cache", default=None, help="features cache file (written once, then read)")
    ap.add_argument("--synthetic", type=int, default=20, help="synthetic images of planted objects (0: none)")
    ap.add_argument("--synthetic-side", type=int, default=None, help="their grid side (default: --side)")
    ap.add_argument("--no-fields", action="store_true", help="skip the smoothed random fields (harder spectra)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-fixture", action="store_true")
    a = ap.parse_args()

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("cut_solver: no CUDA device; nothing to do on cuda")
        sys.exit(2)
    if not a.skip_timing:
        timing(a.side, a.dim, a.repeats, a.device, not a.no_dense)
        if not a.no_fields:
            field_timing(a.side, a.device)
    print(f"(b) agreement, solver=torch vs scipy (the exact path), the same features; torch solve on {a.device}")
    if a.synthetic:
        side = a.synthetic_side or a.side
        agreement(synthetic_items(a.synthetic, side), f"synthetic {side}x{side}", a.device, max_boxes=3)
    if not a.skip_fixture:
        t = time.perf_counter()
        items = fixture_items(a.arch, a.data, a.images, a.size, a.cache)
        print(f"  fixture: {len(items)} VOC07 images at {a.size} x {a.size}, {a.arch} random weights "
              f"({time.perf_counter() - t:.0f} s for the features)", flush=True)
        agreement(items, f"VOC07 {a.arch}", a.device)


if __name__ == "__main__":
    main()
