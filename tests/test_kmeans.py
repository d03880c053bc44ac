"""K-means (faiss): exact recovery of separated blobs, determinism, n_init keeps the lowest inertia."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.clustering.kmeans import assign, kmeans


def blobs(k=5, per=40, d=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 10
    truth = np.repeat(np.arange(k), per)
    x = centres[truth] + rng.normal(size=(k * per, d)) * spread
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm]


def same_partition(a, b) -> bool:
    """Equal up to renaming the clusters: a bijection between label sets."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_separated_blobs_are_recovered_exactly():
    x, truth = blobs()
    res = kmeans(x, 5, seed=0, n_init=5, iters=20)
    assert same_partition(res.labels, truth)
    assert sorted(res.sizes.tolist()) == [40] * 5 and res.sizes.sum() == len(x)
    # the centroids are the blob means; inertia is the (naively computed) sum of squared distances
    for c in range(5):
        np.testing.assert_allclose(res.centroids[c], x[res.labels == c].mean(axis=0), atol=1e-4)
    naive = sum(float(((x[i].astype(np.float64) - res.centroids[res.labels[i]]) ** 2).sum()) for i in range(len(x)))
    assert res.inertia == pytest.approx(naive, rel=1e-6)


def test_same_seed_gives_identical_labels():
    x, _ = blobs(k=8, per=25, spread=3.0, seed=1)  # overlapping blobs: the init matters
    a = kmeans(x, 8, seed=7, n_init=1, iters=10)
    b = kmeans(x, 8, seed=7, n_init=1, iters=10)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia


def test_n_init_keeps_the_lowest_inertia_restart():
    x, _ = blobs(k=6, per=20, d=4, spread=2.5, seed=3)
    singles = [kmeans(x, 6, seed=10 + i, n_init=1, iters=5) for i in range(6)]
    inertias = [s.inertia for s in singles]
    assert len({round(v, 3) for v in inertias}) > 1, "restarts should differ for this test to mean anything"
    best = kmeans(x, 6, seed=10, n_init=6, iters=5)
    assert best.inertia == min(inertias)
    assert best.restart_inertias == inertias
    i = int(np.argmin(inertias))
    assert best.seed == 10 + i and np.array_equal(best.labels, singles[i].labels)


def test_assign_is_nearest_centroid():
    x = np.array([[0, 0], [1, 0], [9, 9], [5, 5]], np.float32)
    c = np.array([[0, 0], [10, 10]], np.float32)
    labels, inertia = assign(x, c)
    assert labels.tolist() == [0, 0, 1, 0]          # (5, 5) is equidistant: lowest index
    assert inertia == pytest.approx(0 + 1 + 2 + 50)


def test_bad_inputs_have_clear_errors():
    x, _ = blobs(k=2, per=3)
    with pytest.raises(ValueError, match="larger than the number of boxes"):
        kmeans(x, 7)
    with pytest.raises(ValueError, match="positive integer"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((4, 2), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(np.zeros((0, 3), np.float32), 1)
