"""TokenCut against a naive implementation (symmetric normalized Laplacian, np.linalg.eigh, loops, BFS)
written here independently of the library, plus hand-computed graphs, degenerate inputs and errors."""
from __future__ import annotations

import sys
import types
from collections import deque

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.discovery.tokencut import GAP_TOL, CutResult, orient, tokencut


# ---------------------------------------------------------------- naive reference
def naive_tokencut(F: np.ndarray, h: int, w: int, p: int, H: int, W: int, tau: float = 0.2, eps: float = 1e-5,
                   seed: int | None = None):
    """Float64 throughout; the callers check that no cosine is within 1e-4 of tau, so the float32 graph of
    the library and this float64 one are the same graph. ``seed`` given: use it instead of the first
    maximum of |x| (for blocks of entries equal up to rounding, where any float solver may pick another)."""
    n = F.shape[0]
    X = F.astype(np.float64)
    norms = [max(np.sqrt(sum(x * x for x in row)), 1e-12) for row in X]
    Xn = np.array([X[i] / norms[i] for i in range(n)])
    cos = Xn @ Xn.T
    Wg = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            Wg[i, j] = 1.0 if cos[i, j] > tau else eps
    d = Wg.sum(axis=1)
    s = 1.0 / np.sqrt(d)
    L = s[:, None] * (np.diag(d) - Wg) * s[None, :]
    vals, vecs = np.linalg.eigh(L)
    x = s * vecs[:, 1]  # back to the generalized problem: x = D^-1/2 y, xᵀDx = 1
    mean = sum(x) / n
    part = [xi > mean for xi in x]
    first = 0
    for i in range(1, n):
        if abs(x[i]) > abs(x[first]):
            first = i
    seed = first if seed is None else seed
    if not part[seed]:
        x = -x
        part = [not b for b in part]
    # BFS from the seed over 4-neighbours inside the partition
    comp = [[False] * w for _ in range(h)]
    sy, sx = divmod(seed, w)
    comp[sy][sx] = True
    todo = deque([(sy, sx)])
    while todo:
        y, xx = todo.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            yy, xn = y + dy, xx + dx
            if 0 <= yy < h and 0 <= xn < w and not comp[yy][xn] and part[yy * w + xn]:
                comp[yy][xn] = True
                todo.append((yy, xn))
    cells = [(y, c) for y in range(h) for c in range(w) if comp[y][c]]
    box = [min(c for _, c in cells) * p, min(y for y, _ in cells) * p,
           min((max(c for _, c in cells) + 1) * p, W), min((max(y for y, _ in cells) + 1) * p, H)]
    margin_mean = float(np.min(np.abs(x - mean)))
    # patches whose |x| equals the maximum up to rounding: any of them may be the seed of a float solver
    near_seed = [i for i in range(n) if abs(x[i]) >= abs(x[first]) - 1e-9]
    return dict(vals=vals, x=x, part=np.array(part).reshape(h, w), seed=seed, mask=np.array(comp), box=box,
                margin_mean=margin_mean, near_seed=near_seed, cos=cos)


def planted(rng: np.random.Generator, h: int, w: int, dim: int, noise: float) -> np.ndarray:
    """A random rectangle with an object direction on a background direction, plus Gaussian noise."""
    bg, obj = rng.normal(size=dim), rng.normal(size=dim)
    obj -= obj @ bg / (bg @ bg) * bg  # orthogonal prototypes: cosine 0 between the two blocks
    F = np.tile(bg / np.linalg.norm(bg), (h * w, 1))
    y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
    y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
    grid = np.zeros((h, w), dtype=bool)
    grid[y0:y1, x0:x1] = True
    if grid.all():
        grid[0, 0] = False
    F[grid.ravel()] = obj / np.linalg.norm(obj)
    F += rng.normal(scale=noise, size=F.shape)
    return F.astype(np.float32)


def test_matches_naive_laplacian_implementation_on_planted_features():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    shapes = [(4, 5), (6, 6), (5, 9), (8, 7), (3, 12), (7, 9)]
    checked = ties = 0
    for trial in range(42):
        h, w = shapes[trial % len(shapes)]
        p = int(rng.choice([8, 16]))
        H = int(rng.integers((h - 1) * p + 1, h * p + 1))
        W = int(rng.integers((w - 1) * p + 1, w * p + 1))
        F = planted(rng, h, w, int(rng.integers(4, 12)), float(rng.choice([0.05, 0.2, 0.35])))
        ref = naive_tokencut(F, h, w, p, H, W)
        # only well-posed cases: no cosine at tau, a clear eigengap, no entry at the mean; near-tied
        # maxima of |x| must have one sign (then they are on one side and the flip is the same)
        near = ref["near_seed"]
        if (np.min(np.abs(ref["cos"] - 0.2)) < 1e-4 or ref["vals"][2] - ref["vals"][1] < 1e-3
                or ref["margin_mean"] < 1e-6 or len({bool(ref["x"][i] > 0) for i in near}) > 1):
            continue
        res = tokencut(torch.from_numpy(F), (h, w), p, (H, W))
        label = f"trial {trial} grid {h}x{w}"
        assert not res.degenerate, label
        if len(near) == 1:
            assert res.seed == ref["seed"], label
        else:  # a block of equal entries: the seed is one of them; the rest must follow from it
            ties += 1
            assert res.seed in near, label
            ref = naive_tokencut(F, h, w, p, H, W, seed=res.seed)
        assert (res.bipartition == ref["part"]).all(), label
        assert (res.mask == ref["mask"]).all(), label
        assert res.box.tolist() == [float(v) for v in ref["box"]], label
        np.testing.assert_allclose(res.eigvals, ref["vals"][1:3], atol=1e-10, err_msg=label)
        np.testing.assert_allclose(res.eigvec, ref["x"].reshape(h, w), atol=1e-7, err_msg=label)
        assert res.score == pytest.approx(min(1.0, max(0.0, 1 - ref["vals"][1])))
        assert res.eigvec.dtype == np.float64 and res.bipartition.dtype == bool and res.mask.dtype == bool
        checked += 1
    assert checked >= 30 and 0 < ties < checked  # the filter must not silently skip everything


# ---------------------------------------------------------------- graphs with a known cut
def two_block(h, w, rows, cols, cos=0.0):
    """Unit features: direction e0 outside, a direction at cosine ``cos`` to e0 on rows x cols."""
    F = torch.zeros(h * w, 2)
    F[:, 0] = 1.0
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[rows, cols] = True
    F[grid.flatten()] = torch.tensor([cos, float(np.sqrt(1 - cos * cos))])
    return F, grid.numpy()


def test_two_blocks_give_exactly_that_partition_and_the_ncut_eigenvalue():
    F, obj = two_block(4, 5, slice(1, 3), slice(1, 3))  # 4 object patches, 16 background patches
    res = tokencut(F, (4, 5), 16, (64, 80))
    assert (res.bipartition == obj).all() and (res.mask == obj).all()
    assert res.seed in (6, 7, 11, 12)  # all object entries of v are equal up to rounding
    assert res.box.tolist() == [16.0, 16.0, 48.0, 48.0]
    # two cliques joined by eps: λ2 = Ncut = eps (n-s)/d_S + eps s/d_B, λ3 = 1 (within-clique vectors)
    n, s, eps = 20, 4, 1e-5
    d_s, d_b = s + eps * (n - s), (n - s) + eps * s
    lam2 = eps * (n - s) / d_s + eps * s / d_b
    np.testing.assert_allclose(res.eigvals, [lam2, 1.0], rtol=1e-9)
    assert res.score == pytest.approx(1 - lam2, abs=1e-12)
    # the oriented eigenvector is positive on the object and constant on each block
    assert (res.eigvec[obj] > 0).all() and np.ptp(res.eigvec[obj]) < 1e-12 and np.ptp(res.eigvec[~obj]) < 1e-12


def test_tau_is_a_strict_threshold_on_the_cosine():
    F, obj = two_block(4, 5, slice(0, 2), slice(3, 5), cos=0.6)
    assert tokencut(F, (4, 5), 16, (64, 80), tau=0.5).degenerate  # cos 0.6 > 0.5: one clique, nothing to cut
    res = tokencut(F, (4, 5), 16, (64, 80), tau=0.7)
    assert not res.degenerate and (res.mask == obj).all() and res.box.tolist() == [48.0, 0.0, 80.0, 32.0]


def test_box_is_the_seed_component_clipped_to_the_unpadded_image():
    # two separate object blobs with the same feature: the bipartition holds both, the box only the seed's
    F, _ = two_block(5, 6, slice(0, 1), slice(0, 1))
    big = torch.zeros(5, 6, dtype=torch.bool)
    big[2:5, 3:6] = True
    F[big.flatten()] = F[0].clone()
    res = tokencut(F, (5, 6), 16, (70, 90))
    assert res.bipartition[0, 0] and res.bipartition[big.numpy()].all() and res.bipartition.sum() == 10
    if res.seed == 0:
        assert res.mask.sum() == 1 and res.box.tolist() == [0.0, 0.0, 16.0, 16.0]
    else:  # the padded box [48, 32, 96, 80] is clipped to W = 90, H = 70
        assert (res.mask == big.numpy()).all() and res.box.tolist() == [48.0, 32.0, 90.0, 70.0]
    # max_boxes: the other component follows, scored by its size relative to the seed's component
    res2 = tokencut(F, (5, 6), 16, (70, 90), max_boxes=3)
    assert len(res2.boxes) == 2 and res2.boxes[0].tolist() == res.box.tolist()
    assert {tuple(b.tolist()) for b in res2.boxes} == {(0.0, 0.0, 16.0, 16.0), (48.0, 32.0, 90.0, 70.0)}
    assert res2.scores[1] == pytest.approx(res2.scores[0] * min(1.0, res2.masks[1].sum() / res2.masks[0].sum()))
    assert res2.seeds[1] in np.flatnonzero(res2.masks[1].ravel())
    assert len(tokencut(F, (5, 6), 16, (70, 90), max_boxes=1).boxes) == 1


# ---------------------------------------------------------------- orientation: flip rule and ties
def test_orient_flips_when_the_seed_is_below_the_mean():
    v = np.array([0.1, 0.1, 0.1, -0.5])  # mean -0.05: the seed (|-0.5|) is on the small side
    o, part, seed = orient(v)
    assert seed == 3 and part.tolist() == [False, False, False, True] and o.tolist() == [-0.1, -0.1, -0.1, 0.5]
    o, part, seed = orient(-v)  # the other sign: no flip, same result
    assert seed == 3 and part.tolist() == [False, False, False, True] and o.tolist() == [-0.1, -0.1, -0.1, 0.5]


def test_orient_ties_go_to_the_first_index_and_the_flip_is_a_logical_not():
    # |v| ties between patch 0 (-0.5) and patch 1 (+0.5): seed 0; mean 0, so the raw partition is {1};
    # the seed is not in it -> logical_not: {0, 2, 3}, which keeps the entries equal to the mean
    o, part, seed = orient(np.array([-0.5, 0.5, 0.0, 0.0]))
    assert seed == 0 and part.tolist() == [True, False, True, True] and o.tolist() == [0.5, -0.5, -0.0, -0.0]
    o, part, seed = orient(np.array([0.5, -0.5, 0.0, 0.0]))
    assert seed == 0 and part.tolist() == [True, False, False, False]


def test_result_does_not_depend_on_the_eigenvector_sign(monkeypatch):
    rng = np.random.default_rng(5)
    F = torch.from_numpy(planted(rng, 7, 8, 6, 0.2))
    plain = tokencut(F, (7, 8), 16, (112, 128))
    seen = []

    def negated(*args, **kwargs):
        vals, vecs = eigh(*args, **kwargs)
        seen.append(vecs[:, 0].copy())
        return vals, -vecs

    eigh = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", negated)
    flipped = tokencut(F, (7, 8), 16, (112, 128))
    assert flipped.seed == plain.seed and flipped.box.tolist() == plain.box.tolist()
    assert (flipped.bipartition == plain.bipartition).all() and (flipped.mask == plain.mask).all()
    np.testing.assert_array_equal(flipped.eigvec, plain.eigvec)
    # exactly one of the two runs went through the flip branch
    v = seen[0]
    assert (v[plain.seed] > v.mean()) != (-v[plain.seed] > (-v).mean())


def test_solve_is_limited_to_one_blas_thread_when_threadpoolctl_is_there(monkeypatch):
    calls = []

    class Limits:
        def __init__(self, limits, user_api):
            calls.append((limits, user_api))

        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    monkeypatch.setitem(sys.modules, "threadpoolctl", types.SimpleNamespace(threadpool_limits=Limits))
    F, obj = two_block(4, 5, slice(1, 3), slice(1, 3))
    assert (tokencut(F, (4, 5), 16, (64, 80)).mask == obj).all()
    assert calls == [(1, "blas"), "enter", "exit"]


# ---------------------------------------------------------------- degenerate inputs: defined fallback
def assert_fallback(res: CutResult, h: int, w: int, H: int, W: int) -> None:
    assert isinstance(res, CutResult) and res.degenerate
    assert len(res.boxes) == 1 and res.box.tolist() == [0.0, 0.0, float(W), float(H)]
    assert res.scores == [0.0] and res.score == 0.0 and res.seed == 0
    assert res.mask.shape == (h, w) and res.mask.all() and res.bipartition.all()
    assert res.eigvec.shape == (h, w) and not res.eigvec.any()


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_patches(n):
    assert_fallback(tokencut(torch.randn(1, n, 5), (1, n), 16, (10, 12 * n)), 1, n, 10, 12 * n)


def test_all_features_equal_zero_or_parallel_have_no_eigengap():
    for F in (torch.ones(12, 4), torch.zeros(12, 4), torch.arange(1, 13.0)[:, None] * torch.tensor([[1.0, 2.0]])):
        res = tokencut(F, (3, 4), 16, (45, 60))
        assert_fallback(res, 3, 4, 45, 60)
        np.testing.assert_allclose(res.eigvals, [1.0, 1.0], atol=1e-12)  # every non-constant vector, λ = 1


def test_three_equal_cliques_have_a_repeated_second_eigenvalue():
    # 3 orthogonal directions on 4 patches each: λ2 = λ3 by symmetry, the second eigenvector is not unique
    F = torch.zeros(12, 3)
    F[torch.arange(12), torch.arange(12) // 4] = 1.0
    res = tokencut(F, (3, 4), 16, (48, 64))
    assert_fallback(res, 3, 4, 48, 64)
    assert res.eigvals[1] - res.eigvals[0] <= GAP_TOL and res.eigvals[0] < 1e-3


def test_single_zero_patch_among_structure_does_not_crash():
    F, obj = two_block(4, 5, slice(1, 3), slice(1, 3))
    F[0] = 0.0  # normalize keeps it zero: its row of the graph is all eps
    res = tokencut(F, (4, 5), 16, (64, 80))
    assert not res.degenerate and (res.mask == obj).all()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tau=1.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau="x"), "tau"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-5), "eps"),
        (dict(eps=float("inf")), "eps"),
        (dict(max_boxes=0), "max_boxes"),
        (dict(dims=(3, 5)), "dims"),
        (dict(feats=torch.randn(2, 12, 4)), "one image at a time"),
        (dict(feats=torch.full((12, 4), float("nan"))), "NaN"),
        (dict(patch_size=0), "patch_size"),
        (dict(image_size=(0, 5)), "image_size"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(feats=torch.randn(12, 4), dims=(3, 4), patch_size=16, image_size=(40, 60)) | kwargs
    with pytest.raises(ValueError, match=match):
        tokencut(**args)


def test_numpy_input_and_batch_of_one():
    F, obj = two_block(4, 5, slice(1, 3), slice(1, 3))
    a = tokencut(F.numpy(), (4, 5), 16, (64, 80))
    b = tokencut(F[None], (4, 5), 16, (64, 80))
    assert a.box.tolist() == b.box.tolist() == [16.0, 16.0, 48.0, 48.0]


def test_draw_cut_picture():
    from pipeline.viz.cut import draw_cut

    F, obj = two_block(4, 5, slice(1, 3), slice(1, 3))
    image = np.full((60, 75, 3), 128, dtype=np.uint8)
    for res in (tokencut(F, (4, 5), 16, (60, 75), max_boxes=2), tokencut(torch.ones(20, 2), (4, 5), 16, (60, 75))):
        pic = draw_cut(image, res, 16, gt_boxes=[[10, 10, 40, 40]], title="tokencut")
        from pipeline.viz import style
        from pipeline.viz.cut import panel_zoom

        k = panel_zoom(60, 75)
        assert pic.size == (3 * 75 * k + 2 * 6, 60 * k + style.LEGEND_BAND) and pic.mode == "RGB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    for _ in range(5):
        F = torch.from_numpy(planted(rng, 9, 11, 8, 0.05))
        a = tokencut(F, (9, 11), 16, (140, 170))
        b = tokencut(F.cuda(), (9, 11), 16, (140, 170))
        assert a.box.tolist() == b.box.tolist() and (a.mask == b.mask).all()
