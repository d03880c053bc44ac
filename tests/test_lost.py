"""LOST against a naive loop implementation (written here, independent of the library) and hand cases."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.discovery import LostResult, lost, run_miner

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- naive reference (pure loops)
def naive_lost(F: np.ndarray, h: int, w: int, p: int, H: int, W: int, k: int):
    """Seed, similars, mask and box by plain loops. A is taken in float64 (exact for the
    integer / dyadic features used below)."""
    n = F.shape[0]
    Fd = F.astype(np.float64)
    A = [[float(np.dot(Fd[i], Fd[j])) for j in range(n)] for i in range(n)]
    degree = []
    for i in range(n):
        c = 0
        for j in range(n):
            if j != i and A[i][j] > 0:
                c += 1
        degree.append(c)
    # explicit stable ordering: by (degree, index)
    order = sorted(range(n), key=lambda i: (degree[i], i))
    seed = order[0]
    potentials = order[:k]
    similars = [q for q in potentials if A[seed][q] > 0]
    heat = [0.0] * n
    for q in similars:
        for j in range(n):
            heat[j] += A[q][j]
    if not similars or not heat[seed] > 0:
        return dict(seed=seed, degree=degree, similars=similars, mask=[[True] * w for _ in range(h)],
                    box=[0.0, 0.0, float(W), float(H)])
    # BFS flood fill of heat > 0 from the seed, 4-connectivity
    mask = [[False] * w for _ in range(h)]
    sy, sx = seed // w, seed % w
    mask[sy][sx] = True
    todo = deque([(sy, sx)])
    while todo:
        y, x = todo.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w and not mask[yy][xx] and heat[yy * w + xx] > 0:
                mask[yy][xx] = True
                todo.append((yy, xx))
    cells = [(y, x) for y in range(h) for x in range(w) if mask[y][x]]
    x1 = min(x for _, x in cells) * p
    y1 = min(y for y, _ in cells) * p
    x2 = min((max(x for _, x in cells) + 1) * p, W)
    y2 = min((max(y for y, _ in cells) + 1) * p, H)
    return dict(seed=seed, degree=degree, similars=similars, mask=mask, box=[x1, y1, x2, y2])


def assert_same(res: LostResult, ref: dict, label: str) -> None:
    assert res.seed == ref["seed"], label
    assert res.degree.tolist() == ref["degree"], label
    assert res.similars.tolist() == ref["similars"], label
    assert res.mask.tolist() == ref["mask"], label
    assert res.box.tolist() == [float(v) for v in ref["box"]], label


# ---------------------------------------------------------------- feature generators
SHAPES = [(1, 1), (1, 7), (9, 1), (1, 30), (25, 1), (3, 4), (5, 5), (4, 9), (7, 6), (6, 13), (11, 11), (10, 14)]


def make_feats(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    d = int(rng.integers(1, 7))
    if kind == "int":  # small integers: many exact ties in A, zeros included
        return rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    if kind == "dyadic":  # multiples of 1/16: exact in float32 and float64
        return (rng.integers(-40, 41, size=(n, d)) / 16.0).astype(np.float32)
    # "blobs": an object prototype vs a background prototype, noisy, with random blob placement
    obj = rng.integers(1, 4, size=d).astype(np.float64)
    bg = -obj + rng.integers(-1, 2, size=d)
    feats = np.tile(bg, (n, 1))
    on = rng.random(n) < rng.uniform(0.1, 0.5)
    feats[on] = obj
    feats += rng.integers(-1, 2, size=(n, d)) * (rng.random((n, d)) < 0.2)
    return feats.astype(np.float32)


@pytest.mark.parametrize("kind", ["int", "dyadic", "blobs"])
def test_matches_naive_on_random_features(kind):
    rng = np.random.default_rng({"int": 0, "dyadic": 1, "blobs": 2}[kind])
    for trial in range(70):
        h, w = SHAPES[trial % len(SHAPES)]
        n = h * w
        p = int(rng.choice([8, 16]))
        H = int(rng.integers((h - 1) * p + 1, h * p + 1))  # unpadded size: grid covers it with padding
        W = int(rng.integers((w - 1) * p + 1, w * p + 1))
        k = int(rng.choice([1, 3, 10, 100, n, n + 5]))
        F = make_feats(rng, n, kind)
        res = lost(torch.from_numpy(F), (h, w), p, (H, W), k_patches=k)
        ref = naive_lost(F, h, w, p, H, W, k)
        assert_same(res, ref, f"{kind} trial {trial} grid {h}x{w} k={k}")
        assert len(res.potentials) == min(k, n)
        assert res.map.shape == (h, w) and res.mask.shape == (h, w)


def test_matches_naive_on_gaussian_features_large_grid():
    """N > 100 = k_patches with real-valued features (float32 A vs float64 A agree in sign here)."""
    rng = np.random.default_rng(3)
    for trial in range(4):
        h, w = [(12, 13), (9, 17), (15, 8), (11, 12)][trial]
        F = rng.normal(size=(h * w, 6)).astype(np.float32)
        F[: h * w // 3] += 1.5  # a correlated block at the top
        res = lost(torch.from_numpy(F), (h, w), 16, (h * 16 - 5, w * 16 - 3))
        ref = naive_lost(F, h, w, 16, h * 16 - 5, w * 16 - 3, 100)
        assert_same(res, ref, f"gaussian trial {trial}")
        assert len(res.potentials) == 100


# ---------------------------------------------------------------- hand-computed cases
def test_hand_case_box_clipped_to_unpadded_image():
    # 3x4 grid, 1-D features: background +1, object -1 at (1,2), (1,3), (2,3) = indices 6, 7, 11.
    F = torch.ones(12, 1)
    F[[6, 7, 11]] = -1
    res = lost(F, (3, 4), 16, (40, 60))
    # object degree 2, background degree 8 -> seed 6; the map is +3 on objects, -3 elsewhere.
    assert res.seed == 6
    assert res.degree.tolist() == [8, 8, 8, 8, 8, 8, 2, 2, 8, 8, 8, 2]
    assert res.similars.tolist() == [6, 7, 11]
    assert res.map[1, 2] == 3.0 and res.map[0, 0] == -3.0
    # padded box would be [32, 16, 64, 48]; the image is 60 wide and 40 high
    assert res.box.tolist() == [32.0, 16.0, 60.0, 40.0]
    assert res.score == pytest.approx(1 - 2 / 11)


def test_hand_case_tie_goes_to_lowest_index_and_seed_component_not_largest():
    # 4x5 grid: a 1-patch object at (0, 1) and a larger object at rows 2-3, cols 2-4, same feature.
    F = torch.ones(20, 1)
    big = [12, 13, 14, 17, 18, 19]
    F[[1] + big] = -1
    res = lost(F, (4, 5), 16, (64, 80))
    # all object patches have degree 6: the tie goes to the lowest index, patch 1
    assert res.seed == 1
    assert res.similars.tolist() == [1] + big
    # the map is positive on both objects; only the seed's (smaller) component is kept
    assert res.mask.sum() == 1 and res.mask[0, 1]
    assert res.box.tolist() == [16.0, 0.0, 32.0, 16.0]


def test_hand_case_k_patches_limits_the_expansion():
    # 1x5 strip, 2-D features. A rows: f0=(1,0) f1=(1,1) f2=(0,1) f3=(2,-1) f4=(-1,0)
    F = torch.tensor([[1.0, 0], [1, 1], [0, 1], [2, -1], [-1, 0]])
    # degrees: p0 {1,3}=2, p1 {0,2,3}=3, p2 {1}=1, p3 {0,1}=2, p4 {}=0 -> order 4,2,0,3,1
    res = lost(F, (1, 5), 10, (10, 50), k_patches=3)
    assert res.degree.tolist() == [2, 3, 1, 2, 0]
    assert res.potentials.tolist() == [4, 2, 0]
    assert res.seed == 4
    assert res.similars.tolist() == [4]  # A[4,2] = 0, A[4,0] = -1
    # map = A[4] = [-1, -1, 0, -2, 1] -> only patch 4
    assert res.map.tolist() == [[-1.0, -1.0, 0.0, -2.0, 1.0]]
    assert res.box.tolist() == [40.0, 0.0, 50.0, 10.0]


def test_zero_seed_feature_falls_back_to_whole_image():
    F = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))  # seeded: only patch 5 has degree 0
    F[5] = 0  # degree 0 -> the seed; A[seed] == 0, no similars
    res = lost(F, (3, 4), 16, (45, 50))
    assert res.seed == 5
    assert len(res.similars) == 0
    assert res.box.tolist() == [0.0, 0.0, 50.0, 45.0]
    assert res.mask.all() and res.score == 0.0


def test_single_patch_and_batch_of_one():
    res = lost(torch.ones(1, 1, 3), (1, 1), 16, (10, 12))
    assert res.seed == 0 and res.box.tolist() == [0.0, 0.0, 12.0, 10.0] and res.score == 1.0


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feats=torch.randn(12, 4), dims=(3, 5)), "dims"),
        (dict(feats=torch.randn(2, 12, 4), dims=(3, 4)), "one image at a time"),
        (dict(feats=torch.full((12, 4), float("nan")), dims=(3, 4)), "NaN"),
        (dict(feats=torch.randn(12, 4), dims=(3, 4), k_patches=0), "k_patches"),
        (dict(feats=torch.randn(12, 4), dims=(3, 4), patch_size=0), "patch_size"),
        (dict(feats=torch.randn(12, 4), dims=(3, 4), image_size=(0, 5)), "image_size"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(patch_size=16, image_size=(40, 60)) | kwargs
    with pytest.raises(ValueError, match=match):
        lost(**args)


# ---------------------------------------------------------------- dispatch and config
def test_run_miner_lost_uses_first_image_and_config_file():
    from omegaconf import OmegaConf

    from stage_utils import compose_cfg

    cfg = OmegaConf.to_container(compose_cfg("mine", ["miner=lost"]).miner)
    assert cfg == {"name": "lost", "k_patches": 100, "crf": False}  # its parameters and every miner's crf
    F = torch.ones(2, 12, 1)
    F[0, [6, 7, 11]] = -1
    fo = SimpleNamespace(feats=F, dims=(3, 4), cls_attn=None)
    res = run_miner(cfg["name"], fo, (40, 60), patch_size=16, **cfg)
    assert isinstance(res, LostResult) and res.box.tolist() == [32.0, 16.0, 60.0, 40.0]
    assert len(res.potentials) == 12
    assert len(run_miner("lost", fo, (40, 60), patch_size=16, k_patches=5).potentials) == 5


def test_run_miner_errors():
    fo = SimpleNamespace(feats=torch.randn(1, 12, 4), dims=(3, 4), cls_attn=None)
    with pytest.raises(ValueError, match=r"unknown miner 'lsot'; known miners: \['dinoseg', .*'lost', .*'tokencut'"):
        run_miner("lsot", fo, (40, 60), patch_size=16)
    with pytest.raises(ValueError, match="patch_size"):
        run_miner("lost", fo, (40, 60))
    with pytest.raises(ValueError, match="unknown parameter"):
        run_miner("lost", fo, (40, 60), patch_size=16, head=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    for _ in range(10):
        F = torch.from_numpy(rng.integers(-2, 3, size=(150, 5)).astype(np.float32))
        a = lost(F, (10, 15), 16, (155, 233))
        b = lost(F.cuda(), (10, 15), 16, (155, 233))
        assert a.seed == b.seed and a.box.tolist() == b.box.tolist()
        assert (a.mask == b.mask).all() and a.similars.tolist() == b.similars.tolist()
