"""TokenCut / MaskCut eigensolve timing on ~1000 tokens, and a thread-count determinism check.

    .venv/bin/python benchmarks/eigensolver.py [--h 30 --w 34 --dim 64 --repeats 5] [--threads-check]

Times, on synthetic key-like features (planted blobs + noise, N = h * w tokens): the float32 graph
(normalize, ``F Fᵀ``, threshold), the dense ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])``
(what the reference and ``pipeline.discovery.tokencut`` run), for comparison the standard-form solve
of the symmetric normalized Laplacian (not used), and a whole ``tokencut`` call.
``--threads-check`` reruns the solve in fresh processes with OPENBLAS_NUM_THREADS / torch threads
1, 2, 4 and prints whether ``A``, ``v`` and the box are bit-identical across them. Not a test.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_feats(h: int, w: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bg = rng.normal(size=dim)
    obj = rng.normal(size=dim)
    feats = np.tile(bg, (h * w, 1))
    grid = np.zeros((h, w), dtype=bool)
    grid[h // 4: h // 4 + h // 3, w // 3: w // 3 + w // 3] = True
    feats[grid.ravel()] = obj
    feats += rng.normal(scale=0.9, size=feats.shape)
    return feats.astype(np.float32)


def run_once(h: int, w: int, dim: int) -> dict:
    """One solve; hashes of A (float32), W, v and the box, for the determinism check."""
    import torch

    from pipeline.discovery.tokencut import binary_graph, solve_cut, tokencut

    F = torch.from_numpy(make_feats(h, w, dim))
    Fn = torch.nn.functional.normalize(F, p=2, dim=1)
    A = (Fn @ Fn.T).numpy()
    W = binary_graph(F, 0.2, 1e-5)
    cut = solve_cut(W)
    res = tokencut(F, (h, w), 16, (h * 16, w * 16))
    sha = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]  # noqa: E731
    return {"A": sha(A), "W": sha(W), "v": sha(cut.v), "eigvals": [float(x) for x in cut.eigvals],
            "box": res.box.tolist(), "bipartition": sha(res.bipartition)}


def timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h", type=int, default=30)
    ap.add_argument("--w", type=int, default=34)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads-check", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("CUT_TORCH_THREADS", "1")))
        print(json.dumps(run_once(args.h, args.w, args.dim)))
        return

    import scipy.linalg
    import torch

    from pipeline.discovery.tokencut import binary_graph, tokencut

    n = args.h * args.w
    F = torch.from_numpy(make_feats(args.h, args.w, args.dim))
    W = binary_graph(F, 0.2, 1e-5)
    D = np.diag(np.sum(W, axis=1))
    t_graph = timeit(lambda: binary_graph(F, 0.2, 1e-5), args.repeats)
    t_eigh = timeit(lambda: scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2]), args.repeats)
    t_full = timeit(lambda: scipy.linalg.eigh(D - W, D), max(1, args.repeats // 2))
    s = 1.0 / np.sqrt(np.diag(D))
    L = s[:, None] * (D - W) * s[None, :]
    t_std = timeit(lambda: scipy.linalg.eigh(L, subset_by_index=[1, 2], driver="evr"), args.repeats)
    v_ref = scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])[1][:, 0]
    v_std = s * scipy.linalg.eigh(L, subset_by_index=[1, 2], driver="evr")[1][:, 0]
    v_std *= np.sign(v_std @ v_ref)
    t_tc = timeit(lambda: tokencut(F, (args.h, args.w), 16, (args.h * 16, args.w * 16)), args.repeats)
    med = lambda t: f"median {1000 * float(np.median(t)):.1f} ms (min {1000 * min(t):.1f})"  # noqa: E731
    print(f"N = {n} tokens, D = {args.dim}, torch threads {torch.get_num_threads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")
    print(f"  graph (normalize, F Fᵀ float32, threshold): {med(t_graph)}")
    print(f"  eigh(D - W, D, subset_by_index=[1, 2]):      {med(t_eigh)}")
    print(f"  eigh(D - W, D) all eigenpairs, for scale:    {med(t_full)}")
    print(f"  alternative, not used: standard form D^-1/2 (D - W) D^-1/2, driver evr, subset [1, 2]: {med(t_std)}; "
          f"max |v - v_ref| = {np.abs(v_std - v_ref).max():.1e}")
    print(f"  tokencut() whole call:                       {med(t_tc)}")

    if args.threads_check:
        results = {}
        for blas in (1, 2, 4):
            for tt in (1, 2):
                env = dict(os.environ, OPENBLAS_NUM_THREADS=str(blas), CUT_TORCH_THREADS=str(tt))
                out = subprocess.run([sys.executable, __file__, "--child", "--h", str(args.h), "--w", str(args.w),
                                      "--dim", str(args.dim)], env=env, capture_output=True, text=True,
                                     check=True).stdout
                results[(blas, tt)] = json.loads(out.strip().splitlines()[-1])
        first = next(iter(results.values()))
        for (blas, tt), r in results.items():
            same = {k: r[k] == first[k] for k in ("A", "W", "v", "eigvals", "box", "bipartition")}
            print(f"  openblas {blas} / torch {tt} threads: identical to the first run: {same}; "
                  f"λ = {r['eigvals']}, box {r['box']}")


if __name__ == "__main__":
    main()
