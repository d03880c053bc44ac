"""K-means with faiss: ``n_init`` seeded restarts, the lowest inertia wins.

The reference clusters with ``scipy.cluster.vq.kmeans2`` (one random init, 10 iterations, numpy's
global seed 123); the project specifies faiss (``faiss.Kmeans``: random init from the points,
Lloyd iterations, an empty cluster is re-seeded by splitting a large one). Restart ``i`` uses seed
``seed + i``; ties in inertia keep the earlier restart. The whole dataset is used (no faiss
sub-sampling), so a given seed gives identical labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KMeansResult:
    """``labels[i]`` in ``0..k-1``; ``inertia`` = sum of squared distances to the assigned centroid."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    sizes: np.ndarray
    seed: int = 0
    restart_inertias: list[float] | None = None


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest centroid of every row (lowest index on ties) and the total squared distance (float64)."""
    x64 = np.asarray(x, np.float64)
    c64 = np.asarray(centroids, np.float64)
    d2 = (x64 * x64).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64 * c64).sum(1)[None, :]
    labels = d2.argmin(axis=1)
    diff = x64 - c64[labels]
    return labels.astype(np.int64), float((diff * diff).sum())


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 1, iters: int = 20) -> KMeansResult:
    """Cluster the rows of ``x`` (n, d) into ``k`` groups; see the module docstring."""
    import faiss

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"k-means needs a non-empty (n, d) array of features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("k-means features contain NaN or inf: check the feature extraction / whitening.")
    n, d = x.shape
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of boxes ({n}): lower k or cluster more boxes.")
    if n_init < 1 or iters < 1:
        raise ValueError(f"n_init and iters must be >= 1, got {n_init} and {iters}")

    best: KMeansResult | None = None
    inertias = []
    for i in range(n_init):
        km = faiss.Kmeans(d, int(k), niter=int(iters), seed=int(seed + i), nredo=1, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(n, 1 << 20))
        km.train(x)
        centroids = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
        labels, inertia = assign(x, centroids)
        inertias.append(inertia)
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels, centroids, inertia, np.bincount(labels, minlength=k), seed + i)
    best.restart_inertias = inertias
    return best
