"""The torch cut solver (``solver="torch"``) against the exact path (scipy's generalized eigh): eigenpairs on
small graphs, a graph with a known cut, degenerate graphs, batches, the miners' ``solver`` parameter."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.discovery import build_miner
from pipeline.discovery import cut_solver
from pipeline.discovery.cut_solver import binary_graph_torch, solve_cut_torch, solve_cuts
from pipeline.discovery.maskcut import maskcut, maskcut_batch
from pipeline.discovery.miners import Miner
from pipeline.discovery.tokencut import binary_graph, orient, solve_cut, tokencut, tokencut_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(h: int, w: int, rects, dim: int = 16, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Orthonormal directions: background 0, object k+1 on ``rects[k]`` = (y0, y1, x0, x1); Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, : len(rects) + 1].T
    lab = torch.zeros(h, w, dtype=torch.long)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        lab[y0:y1, x0:x1] = k + 1
    return dirs[lab.flatten()] + noise * torch.randn(h * w, dim, generator=g)


def same_vector(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Equal up to the eigenvector's arbitrary sign."""
    sign = 1.0 if float(a @ b) >= 0 else -1.0
    np.testing.assert_allclose(sign * a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- the eigenpair
@pytest.mark.parametrize("h, w, noise, seed", [(8, 9, 0.3, 0), (12, 20, 0.5, 1), (17, 19, 0.4, 2), (20, 20, 0.6, 3),
                                               (18, 24, 0.8, 4)])
def test_second_eigenvector_equals_scipys_generalized_eigh(h, w, noise, seed):
    # 72 and 240 nodes: dense (on a CPU: the exact path itself); 323, 400 and 432: the block Krylov method
    F = planted(h, w, [(1, h // 2, 2, w // 2)], noise=noise, seed=seed)
    W = binary_graph(F, 0.2, 1e-5)
    exact, fast = solve_cut(W), solve_cut_torch(torch.from_numpy(W))
    assert exact.v is not None and fast.v is not None
    np.testing.assert_allclose(fast.eigvals[0], exact.eigvals[0], atol=1e-12)
    np.testing.assert_allclose(fast.eigvals[1], exact.eigvals[1], atol=1e-6)
    same_vector(fast.v, exact.v, atol=1e-9)
    assert fast.v @ (W.sum(axis=1) * fast.v) == pytest.approx(1.0, abs=1e-9)  # D-normalised, as scipy's
    # the orientation rule sees the same vector: the same bipartition and seed whatever the signs
    (vf, part_f, seed_f), (ve, part_e, seed_e) = orient(fast.v), orient(exact.v)
    np.testing.assert_allclose(vf, ve, atol=1e-9)
    assert (part_f == part_e).all() and seed_f == seed_e


def test_the_gpus_dense_fallback_equals_scipys_generalized_eigh():
    # on a CPU the dense cases take the exact path itself; on a GPU torch.linalg.eigh of L (checked here on a CPU)
    for k, (h, w) in enumerate([(8, 9), (12, 20)]):
        W = binary_graph(planted(h, w, [(1, h // 2, 2, w // 2)], noise=0.4, seed=k), 0.2, 1e-5)
        Wt = torch.from_numpy(W)[None]
        cut, exact = cut_solver._dense_eigh(Wt, Wt.sum(-1).rsqrt())[0], solve_cut(W)
        np.testing.assert_allclose(cut.eigvals, exact.eigvals, atol=1e-12)
        same_vector(cut.v, exact.v, atol=1e-10)
    assert cut_solver._dense_eigh(torch.ones(1, 5, 5, dtype=torch.float64), torch.full((1, 5), 5 ** -0.5,
                                  dtype=torch.float64))[0].v is None


def test_numpy_and_torch_inputs_and_the_graph_on_the_device_are_the_same():
    F = planted(16, 20, [(2, 9, 3, 11)], seed=5)
    W = binary_graph(F, 0.2, 1e-5)
    Wt = binary_graph_torch(F, 0.2, 1e-5)
    assert Wt.dtype == torch.float64 and torch.equal(Wt, torch.from_numpy(W))  # the same graph, bit for bit
    a, b = solve_cut_torch(W), solve_cut_torch(Wt)
    np.testing.assert_array_equal(a.v, b.v)
    assert solve_cuts(W, "scipy").v.tolist() == solve_cut(W).v.tolist()


def two_cliques(n: int, s: int, eps: float = 1e-5) -> np.ndarray:
    W = np.full((n, n), eps)
    W[:s, :s] = 1.0
    W[s:, s:] = 1.0
    return W


@pytest.mark.parametrize("n, s", [(60, 15), (300, 110)])   # dense eigh; block Krylov
def test_two_clusters_give_the_known_bipartition_with_both_solvers(n, s):
    eps = 1e-5
    W = two_cliques(n, s, eps)
    # λ2 = Ncut = eps (n-s)/d_S + eps s/d_B; λ3 = 1 (vectors inside one clique)
    d_s, d_b = s + eps * (n - s), (n - s) + eps * s
    lam2 = eps * (n - s) / d_s + eps * s / d_b
    for cut in (solve_cut(W), solve_cut_torch(W)):
        np.testing.assert_allclose(cut.eigvals, [lam2, 1.0], rtol=1e-9)
        v, part, seed = orient(cut.v)
        assert part[:s].all() and not part[s:].any()     # the small clique: larger |v|, above the mean
        assert seed < s and np.ptp(v[:s]) < 1e-12 and np.ptp(v[s:]) < 1e-12


@pytest.mark.parametrize("n", [2, 40, 300])
def test_degenerate_graphs_are_degenerate_with_both_solvers(n):
    for W in (np.ones((n, n)), np.full((n, n), 1e-5)):  # all features equal; all features zero
        for cut in (solve_cut(W), solve_cut_torch(W)):
            assert cut.v is None


def test_a_repeated_second_eigenvalue_is_degenerate_with_both_solvers():
    # three equal cliques of 110 nodes: any one of them cut off costs the same (λ2 = λ3)
    n = 330
    W = np.full((n, n), 1e-5)
    for a in (0, 110, 220):
        W[a:a + 110, a:a + 110] = 1.0
    exact, fast = solve_cut(W), solve_cut_torch(W)
    assert exact.v is None and fast.v is None
    np.testing.assert_allclose(fast.eigvals, exact.eigvals, atol=1e-12)


def test_without_convergence_it_falls_back_to_the_dense_eigh(monkeypatch):
    F = planted(18, 20, [(2, 10, 3, 12)], noise=0.6, seed=6)
    W = binary_graph(F, 0.2, 1e-5)
    monkeypatch.setattr(cut_solver, "MAX_DIM", 12)  # three blocks: not converged on this graph
    calls = []
    dense = cut_solver._dense
    monkeypatch.setattr(cut_solver, "_dense", lambda *a: calls.append(1) or dense(*a))
    fast, exact = solve_cut_torch(W), solve_cut(W)
    assert calls == [1]
    same_vector(fast.v, exact.v, atol=1e-9)


def test_a_batch_gives_each_graphs_own_result():
    graphs = np.stack([binary_graph(planted(16, 20, [(2, 8 + k, 3, 9 + k)], seed=k), 0.2, 1e-5) for k in range(3)])
    batch = solve_cut_torch(torch.from_numpy(graphs))
    assert isinstance(batch, list) and len(batch) == 3
    for W, cut in zip(graphs, batch):
        one = solve_cut_torch(W)
        np.testing.assert_array_equal(cut.v, one.v)        # the same bits on a CPU (same start, same checks)
        np.testing.assert_array_equal(cut.eigvals, one.eigvals)
        same_vector(cut.v, solve_cut(W).v, atol=1e-9)
    assert solve_cut_torch(np.zeros((0, 5, 5))) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"W must be \(N, N\) or \(B, N, N\)"):
        solve_cut_torch(np.ones((3, 4)))
    with pytest.raises(ValueError, match="solver must be one of scipy, torch"):
        solve_cuts(np.ones((3, 3)), "numpy")


# ---------------------------------------------------------------- the miners
def test_solver_is_a_checked_miner_parameter_at_the_old_behaviour():
    for name in ("tokencut", "maskcut"):
        assert Miner.recorded({"tau": 0.2, "solver": "scipy"}) == {"tau": 0.2}   # earlier runs stay up to date
        assert build_miner(name, 16).params["solver"] == "scipy"
        assert build_miner(name, 16, solver="torch").params["solver"] == "torch"
        for bad in ("cuda", "Torch", None, 1):
            with pytest.raises(ValueError, match=f"{name}: solver must be one of scipy, torch"):
                build_miner(name, 16, solver=bad)
    assert Miner.recorded({"solver": "torch"}) == {"solver": "torch"}
    with pytest.raises(ValueError, match="tokencut: solver must be one of scipy, torch"):
        tokencut(planted(4, 5, [(1, 3, 1, 3)]), (4, 5), 16, (64, 80), solver="lapack")
    with pytest.raises(ValueError, match="maskcut: solver must be one of scipy, torch"):
        maskcut(planted(4, 5, [(1, 3, 1, 3)]), (4, 5), 16, (64, 80), solver="lapack")


def test_the_config_check_names_the_key():
    from stage_utils import compose_cfg
    from stages.checks import config_errors

    assert config_errors(compose_cfg("mine", ["miner=maskcut", "miner.solver=torch"]), "mine") == []
    errors = config_errors(compose_cfg("mine", ["miner=tokencut", "miner.solver=gpu"]), "mine")
    assert len(errors) == 1 and errors[0].startswith("miner.solver=gpu: solver must be one of scipy, torch")


RECTS = [(2, 8, 3, 11), (11, 17, 2, 7), (6, 15, 13, 21)]  # three objects on an 18 x 24 grid (432 patches)


@pytest.mark.parametrize("name, params", [("tokencut", {"max_boxes": 2}), ("maskcut", {"num_objects": 3})])
def test_solver_torch_gives_the_same_boxes_as_scipy_through_build_miner(name, params):
    from pipeline.backbones import FeatureOutput

    h, w, p = 18, 24, 16
    # a clear case: three objects, found in three cuts. (Once every object is zeroed, the next cut's largest
    # |v| is among the zeroed patches, whose entries are equal up to rounding: its seed, and so what the stage
    # finds, is then a rounding choice in either solver, as it is between BLAS thread counts.)
    outputs = [FeatureOutput(feats=planted(h, w, RECTS, noise=0.2 + 0.05 * k, seed=10 + k)[None], dims=(h, w),
                             cls_attn=None) for k in range(3)]
    sizes = [(h * p - 5, w * p), (h * p, w * p - 9), (h * p, w * p)]
    exact = build_miner(name, p, **params).mine_batch(outputs, sizes)
    fast_miner = build_miner(name, p, solver="torch", **params)
    fast = fast_miner.mine_batch(outputs, sizes)                    # batched: one solve per stage
    one = [fast_miner(o, s) for o, s in zip(outputs, sizes)]        # one image at a time
    for e, f, o in zip(exact, fast, one):
        assert [b.tolist() for b in f.boxes] == [b.tolist() for b in e.boxes]
        assert [m.tolist() for m in f.masks] == [m.tolist() for m in e.masks]
        assert f.seeds == e.seeds and f.stop == e.stop and not f.degenerate
        np.testing.assert_allclose(f.eigvec, e.eigvec, atol=1e-9)    # the same orientation
        np.testing.assert_allclose(f.scores, e.scores, atol=1e-12)
        assert [b.tolist() for b in o.boxes] == [b.tolist() for b in f.boxes]
        np.testing.assert_array_equal(o.eigvec, f.eigvec)
    assert all(len(e.boxes) >= 2 for e in exact)


def test_batch_functions_check_their_input():
    with pytest.raises(ValueError, match="tokencut_batch: feats must be"):
        tokencut_batch(torch.zeros(5, 4), (1, 5), 16, [(16, 80)])
    with pytest.raises(ValueError, match="maskcut_batch: 1 feature maps but 2 image sizes"):
        maskcut_batch(torch.zeros(1, 5, 4), (1, 5), 16, [(16, 80), (16, 80)])
    assert tokencut_batch(torch.zeros(0, 5, 4), (1, 5), 16, []) == []
    # the scipy solver through the batch function is the exact path, bit for bit
    F = planted(6, 7, [(1, 4, 2, 5)], seed=3)
    a = tokencut_batch(F[None], (6, 7), 16, [(96, 112)], solver="scipy")[0]
    b = tokencut(F, (6, 7), 16, (96, 112))
    assert a.box.tolist() == b.box.tolist() and np.array_equal(a.eigvec, b.eigvec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_solve_agrees_with_the_cpu():
    F = planted(20, 24, RECTS, seed=7)
    W = binary_graph(F, 0.15, 1e-5)
    gpu = solve_cut_torch(torch.from_numpy(W).cuda())
    same_vector(gpu.v, solve_cut(W).v, atol=1e-9)
    res = maskcut(F.cuda(), (20, 24), 16, (320, 384), solver="torch")
    ref = maskcut(F, (20, 24), 16, (320, 384))
    assert [b.tolist() for b in res.boxes] == [b.tolist() for b in ref.boxes]


def test_mine_stage_with_the_torch_solver_batched(tmp_path):
    """``miner.solver=torch`` through the mining loop with 3 images per batch (the batched ``mine_batch``): boxes,
    masks and scores written; the solver is part of the run's identity, the default ``scipy`` is not (runs
    made before the option existed stay up to date)."""
    from PIL import Image

    from pipeline.rerun import RerunRefused
    from stage_utils import compose_cfg
    from stages.mine import run

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # 18 x 20 patches of 16 px: 360 tokens, the Krylov path
        img = np.zeros((288, 320, 3), dtype=np.uint8) + np.uint8(40 * i)
        img[60:200, 80 + 20 * i:220] = (200, 30, 30)
        Image.fromarray(np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)).save(
            src / f"im{i}.png")
    common = [f"paths.output_root={tmp_path}", "backbone.init=random", "num_workers=0", "progress=false",
              "dataset=folder", f"dataset.root={src}", "miner=maskcut", "mine.procs=1", "viz.num_images=1"]
    metrics = run(compose_cfg("mine", [*common, "miner.solver=torch", "mine.batch_size=3"]))
    stage = tmp_path / "folder" / "dino_vits16" / "mine_maskcut"
    data = json.loads((stage / "pseudo_boxes.json").read_text())
    assert metrics["images"] == 3 and metrics["failures"] == 0 and len(data["annotations"]) >= 3
    assert all(a["segmentation"]["counts"] and 0 <= a["score"] <= 1 for a in data["annotations"])
    assert json.loads((stage / "manifest.json").read_text())["artifact"]["miner"]["solver"] == "torch"
    with pytest.raises(RerunRefused, match=r"changed: miner.solver: torch -> \(default\)"):  # not "null"
        run(compose_cfg("mine", common))
    exact = run(compose_cfg("mine", [*common, "force=true"]))
    assert exact["images"] == 3
    artifact = json.loads((stage / "manifest.json").read_text())["artifact"]  # the run's identity
    assert artifact["miner"]["name"] == "maskcut" and "solver" not in artifact["miner"]
    exact_data = json.loads((stage / "pseudo_boxes.json").read_text())
    assert [a["bbox"] for a in exact_data["annotations"]] == [a["bbox"] for a in data["annotations"]]
