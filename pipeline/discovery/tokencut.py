"""TokenCut (Wang et al., CVPR 2022): one normalized cut of the patch graph, box of the seed's component.

Features in, result out; no I/O. Written from the paper and checked against the reference
``object_discovery.py`` (functions ``ncut`` and ``detect_box``) of the TokenCut repository, binary-graph
path (``no_binary_graph=False``, the default). Steps, in the reference's order:

1. ``F = normalize(feats)`` per patch (torch ``F.normalize`` semantics: ``x / max(||x||, 1e-12)``, so
   an all-zero feature stays zero), float32; ``A = F Fᵀ`` in float32 on the features' device.
2. Binary graph in float64: ``W = 1`` where ``A > tau`` and ``eps`` elsewhere. The diagonal is 1
   (self-similarity 1 > tau) except for all-zero features, whose row and diagonal are all ``eps``.
   ``d = W.sum(axis=1)``, ``D = diag(d)``.
3. ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])`` (the generalized symmetric problem
   ``(D - W) x = λ D x``; scipy picks LAPACK ``?sygvx``). Column 0 is the second-smallest eigenvector
   ``v`` (λ₂); column 1 (λ₃) is not used by the reference, only here for the degeneracy check.
4. ``avg = sum(v) / N``; ``bipartition = v > avg``; ``seed = argmax |v|`` (first index on ties,
   np.argmax), taken on the *unflipped* ``v``. If ``bipartition[seed]`` is False: ``v = -v`` and
   ``bipartition = logical_not(bipartition)`` (note: the flipped partition is ``v <= avg``, not
   ``-v > mean(-v)``; they differ only on entries exactly equal to the mean; matched).
5. ``scipy.ndimage.label`` of the (h, w) bipartition (default structure: 4-connectivity); the box is
   the patch extent of the seed's component only (not of the whole partition):
   ``[xmin, ymin, xmax + 1, ymax + 1] * patch_size``, x2 clipped to W and y2 to H of the unpadded
   image (exactly :func:`pipeline.discovery.lost.grid_mask_box`). The seed is always inside the
   partition after step 4, so its component is never the background label 0.

The eigenvector's sign is arbitrary (LAPACK may return ``v`` or ``-v``); step 4 makes the result
independent of it except for exact ties: an entry exactly at the mean, or ``|v|`` maximal at two
entries of opposite sign.

Determinism (measured with ``benchmarks/eigensolver.py --threads-check``, N = 1020 tokens): ``A`` (torch
float32 ``F Fᵀ``, MKL here) was bit-identical for 1 and 2 torch threads. The eigensolve (scipy's
OpenBLAS ``?sygvx``) was *not*: ``v`` and ``λ`` from 1 OpenBLAS thread differ in the last bits (λ by
~1e-15) from 2 or 4 threads (2 and 4 agreed); the box and bipartition were the same. In the tests,
the thread count did change the *seed* inside a block of patches with identical features (their ``v``
entries are equal up to rounding, so ``argmax |v|`` picks among them by the last bits); the box
changes with it only if that block is split into several components. What last-bit differences can
move: an ``A`` entry within ~1e-7 of ``tau`` (one edge flips
1 <-> eps; also CPU vs GPU ``A``), a ``v`` entry within rounding of the mean (one patch changes side),
and near-equal ``|v|`` maxima (another seed). The solve is therefore run with OpenBLAS limited to one
thread with ``threadpoolctl`` (:func:`blas_single_thread`), whatever OpenBLAS was started with.
One thread is also much faster on a busy machine: on 2 shared cores at load 8-13, one 1020-token solve
took 0.33-0.5 s with one thread and 2.5-10 s with OpenBLAS's default two (its threads spin-wait).
Degenerate problems, where the second eigenvector is not unique and *any* BLAS difference could change
it, fall back (below) instead of returning a BLAS-dependent cut.

Solvers (``solver=``): ``"scipy"`` (default) is the exact path above, bit-identical to what it was before
the option existed. ``"torch"`` (opt-in) builds the same graph on the features' device
(:func:`~pipeline.discovery.cut_solver.binary_graph_torch`: the same float32 ``F Fᵀ``, so the same ``W``) and
solves the same problem as the standard eigenproblem of ``I - D^-1/2 W D^-1/2`` by a float64 block Krylov
method (:func:`~pipeline.discovery.cut_solver.solve_cut_torch`; dense ``torch.linalg.eigh`` where that does not
converge or the gap is small), mapped back by ``D^-1/2`` to scipy's D-normalised ``v``. The vector agrees with
scipy's to ~1e-9 or better, and its sign is as arbitrary, so step 4 applies unchanged; only a patch within that
of the mean or of the seed's ``|v|`` can differ. :func:`tokencut_batch` solves several same-size images together.

Deviations from the reference, all in cases where it crashes or returns an arbitrary vector:

* ``N < 3`` patches: the reference's ``subset_by_index=[1, 2]`` raises; here: fallback.
* no eigengap, ``λ₃ - λ₂ <= GAP_TOL`` (all features equal, all features zero, ...): the second
  eigenvalue is repeated and its eigenvector is an arbitrary (BLAS-dependent) vector of the
  eigenspace; here: fallback.

Fallback: one whole-image box ``[0, 0, W, H]``, score 0.0, ``seed = 0``, eigvec all zero, bipartition
and mask all True, ``degenerate = True`` (LOST's fallback is the same whole-image box).

Score: ``clip(1 - λ₂, 0, 1)``. λ₂ is the relaxed normalized-cut cost of the bipartition (Shi & Malik:
the minimum of ``xᵀ(D - W)x / xᵀDx`` over ``x`` D-orthogonal to the constant vector, a lower bound of
``cut/vol(S) + cut/vol(S̄)``). It is near 1 for a graph that splits into two weakly connected parts
(``λ₂ ≈ 0``) and 0 for a graph with nothing to split (all similar: ``λ₂ = 1``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch

from pipeline.discovery.cut_solver import binary_graph_torch, check_solver, graph_cuts, solve_cut_torch
from pipeline.discovery.lost import as_feats, check_grid, check_positive_int, grid_mask_box

# λ₃ - λ₂ at or below this counts as "no eigengap" (repeated λ₂, eigenvector not unique). The pencil
# is scaled so its eigenvalues lie in [0, 2]; LAPACK's eigenvalue error is ~1e-16 * N here.
GAP_TOL = 1e-9


def blas_single_thread():
    """Context limiting BLAS/LAPACK to one thread (``threadpoolctl``, a dependency): the eigen solve then
    gives the same bits whatever the machine's thread count, and is faster on a busy machine."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class FirstOfRanked:
    """``box``, ``score`` and ``mask`` of a result holding ranked ``boxes``, ``scores`` and ``masks``: the first's."""

    @property
    def box(self) -> np.ndarray:
        return self.boxes[0]

    @property
    def score(self) -> float:
        return self.scores[0]

    @property
    def mask(self) -> np.ndarray:
        return self.masks[0]


@dataclass
class CutResult(FirstOfRanked):
    """What TokenCut / MaskCut found in one image (CPU numpy; patch indices row-major).

    ``boxes``: float64 (4,) xyxy pixel boxes, x2/y2 exclusive, in rank order (MaskCut: order found);
    ``scores``: one float in [0, 1] per box; ``masks``: one (h, w) bool patch mask per box;
    ``seeds``: one patch index per box; ``seed``: ``seeds[0]``; ``eigvec``: (h, w) float64 second
    eigenvector of the first cut, sign-oriented so the first object's side is the ``bipartition`` side;
    ``bipartition``: (h, w) bool, the first cut's foreground side; ``eigvals``: (2,) float64
    ``(λ₂, λ₃)`` of the first cut (NaN when not solved); ``degenerate``: True for the whole-image
    fallback; ``stop``: MaskCut only, why its loop ended (``"num_objects"``, ``"degenerate"``,
    ``"overlap"``, ``"small"``, ``"empty"``; see :mod:`pipeline.discovery.maskcut`), ``""`` for TokenCut.
    ``box``, ``score`` and ``mask`` are the first box's.
    """

    boxes: list[np.ndarray]
    scores: list[float]
    seed: int
    eigvec: np.ndarray
    bipartition: np.ndarray
    masks: list[np.ndarray]
    seeds: list[int] = field(default_factory=list)
    eigvals: np.ndarray = field(default_factory=lambda: np.full(2, np.nan))
    degenerate: bool = False
    stop: str = ""


@dataclass
class Cut:
    """One solved cut: ``v`` (N,) unflipped second eigenvector, ``eigvals`` (λ₂, λ₃); or ``v is None``
    when the problem is degenerate (N < 3 or no eigengap)."""

    v: np.ndarray | None
    eigvals: np.ndarray

    @property
    def score(self) -> float:
        return float(np.clip(1.0 - self.eigvals[0], 0.0, 1.0))


def check_graph_params(tau, eps, what: str) -> tuple[float, float]:
    try:
        tau_f, eps_f = float(tau), float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: tau and eps must be numbers, got tau={tau!r}, eps={eps!r}") from None
    if isinstance(tau, bool) or not -1.0 < tau_f < 1.0:
        raise ValueError(f"{what}: tau must be in (-1, 1) (a cosine-similarity threshold), got {tau!r}")
    if isinstance(eps, bool) or not (eps_f > 0.0 and np.isfinite(eps_f)):
        raise ValueError(f"{what}: eps must be a finite number > 0 (the weight of non-edges), got {eps!r}")
    return tau_f, eps_f


def binary_graph(F: torch.Tensor, tau: float, eps: float) -> np.ndarray:
    """(N, N) float64 ``W``: 1 where the cosine similarity (float32) is ``> tau``, ``eps`` elsewhere."""
    Fn = torch.nn.functional.normalize(F, p=2, dim=1)
    A = (Fn @ Fn.T).cpu().numpy()
    return np.where(A > tau, 1.0, eps)


def solve_cut(W: np.ndarray) -> Cut:
    """Second-smallest generalized eigenpair of ``(D - W) x = λ D x`` as the reference solves it."""
    n = W.shape[0]
    if n < 3:
        return Cut(None, np.full(2, np.nan))
    d = np.sum(W, axis=1)
    D = np.diag(d)
    with blas_single_thread():
        vals, vecs = scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2])
    vals = np.asarray(vals, dtype=np.float64)
    if not vals[1] - vals[0] > GAP_TOL:
        return Cut(None, vals)
    return Cut(np.array(vecs[:, 0], dtype=np.float64), vals)


def graph_cut(F: torch.Tensor, tau: float, eps: float, solver: str = "scipy") -> Cut:
    """The binary graph of ``F`` (N, D) and its cut: ``solver="scipy"``: :func:`binary_graph` and
    :func:`solve_cut` (the exact path); ``"torch"``: the same graph kept on ``F``'s device and
    :func:`~pipeline.discovery.cut_solver.solve_cut_torch`."""
    if solver == "torch":
        return solve_cut_torch(binary_graph_torch(F, tau, eps))
    return solve_cut(binary_graph(F, tau, eps))


def orient(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """TokenCut's step 4 on an eigenvector ``v`` (N,): ``(v, bipartition, seed)`` with ``bipartition =
    v > sum(v) / N`` and ``seed = argmax |v|`` (first on ties); when the seed is not in the bipartition,
    ``v`` is negated and the bipartition replaced by its logical_not (so it is then ``v_raw <= mean``)."""
    avg = np.sum(v) / len(v)
    bipartition = v > avg
    seed = int(np.argmax(np.abs(v)))
    if not bipartition[seed]:
        v = -v
        bipartition = np.logical_not(bipartition)
    return v, bipartition, seed


def seed_component(bipartition: np.ndarray, seed: int) -> np.ndarray:
    """(h, w) bool 4-connected component of ``bipartition`` (h, w) holding patch ``seed``."""
    labels, _ = scipy.ndimage.label(bipartition)
    sy, sx = divmod(int(seed), bipartition.shape[1])
    return labels == labels[sy, sx]


def fallback_result(h: int, w: int, H: int, W: int, eigvals: np.ndarray) -> CutResult:
    full = np.ones((h, w), dtype=bool)
    return CutResult(boxes=[np.array([0.0, 0.0, float(W), float(H)])], scores=[0.0], seed=0,
                     eigvec=np.zeros((h, w)), bipartition=full, masks=[full.copy()], seeds=[0],
                     eigvals=np.asarray(eigvals, dtype=np.float64), degenerate=True)


def tokencut(feats: torch.Tensor, dims: tuple[int, int], patch_size: int, image_size: tuple[int, int],
             tau: float = 0.2, eps: float = 1e-5, max_boxes: int = 1, solver: str = "scipy") -> CutResult:
    """Run TokenCut on the patch features of one image (see the module docstring for every step).

    ``feats``: (N, D) last-block features (keys by default; q or v work the same), N = h * w patches
    row-major, CLS dropped, a leading batch of 1 accepted, CPU or CUDA; ``dims = (h, w)``;
    ``image_size = (H, W)`` of the unpadded image.

    ``solver``: ``"scipy"`` (default, the reference's exact path: :func:`solve_cut`) or ``"torch"`` (the
    fast solve on the features' device, :func:`pipeline.discovery.cut_solver.solve_cut_torch`: the same
    eigenvector up to ~1e-9, so the same box except where a patch sits within that of a decision).

    ``max_boxes`` (default 1 = the reference): with ``k > 1`` the other 4-connected components of the
    same bipartition follow the seed's one, largest first (equal sizes: lowest label, i.e. first in
    row-major order), up to ``k`` boxes in all. Box ``i > 0`` scores
    ``score * min(1, size_i / size_seed_component)``.
    """
    F = as_feats(feats, "tokencut")
    n = F.shape[0]
    h, w, p, H, W = check_grid(n, dims, patch_size, image_size, "tokencut")
    tau, eps = check_graph_params(tau, eps, "tokencut")
    check_positive_int("tokencut", "max_boxes", max_boxes)
    check_solver(solver, "tokencut")
    return finish_tokencut(graph_cut(F, tau, eps, solver), h, w, p, H, W, max_boxes)


def finish_tokencut(cut: Cut, h: int, w: int, p: int, H: int, W: int, max_boxes: int = 1) -> CutResult:
    """TokenCut's steps 4-5 on a solved cut (the bipartition, the seed, its component and the boxes)."""
    if cut.v is None:
        return fallback_result(h, w, H, W, cut.eigvals)
    v, bipartition, seed = orient(cut.v)
    bip = bipartition.reshape(h, w)
    labels, count = scipy.ndimage.label(bip)
    sy, sx = divmod(seed, w)
    seed_label = labels[sy, sx]
    mask = labels == seed_label
    score = cut.score
    boxes, scores, masks, seeds = [grid_mask_box(mask, p, (H, W))], [score], [mask], [seed]
    if int(max_boxes) > 1 and count > 1:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        others = [lab for lab in range(1, count + 1) if lab != seed_label]
        others.sort(key=lambda lab: (-sizes[lab], lab))  # largest first, then lowest label
        for lab in others[: int(max_boxes) - 1]:
            m = labels == lab
            boxes.append(grid_mask_box(m, p, (H, W)))
            scores.append(float(score * min(1.0, sizes[lab] / sizes[seed_label])))
            masks.append(m)
            flat = np.flatnonzero(m.ravel())
            seeds.append(int(flat[np.argmax(np.abs(v[flat]))]))
    return CutResult(boxes=boxes, scores=scores, seed=seed, eigvec=v.reshape(h, w).copy(), bipartition=bip,
                     masks=masks, seeds=seeds, eigvals=cut.eigvals, degenerate=False)


def tokencut_batch(feats: torch.Tensor, dims: tuple[int, int], patch_size: int,
                   image_sizes: Sequence[tuple[int, int]], tau: float = 0.2, eps: float = 1e-5,
                   max_boxes: int = 1, solver: str = "torch") -> list[CutResult]:
    """TokenCut on ``B`` images of one patch grid (``feats`` (B, N, D), CPU or CUDA): the graphs built on the
    features' device (one ``F Fᵀ`` per image) and solved together
    (:func:`~pipeline.discovery.cut_solver.graph_cuts`), each image finished on the CPU. Each result is what
    :func:`tokencut` gives for that image (``solver="scipy"``: bit for bit; ``"torch"``: on a CPU; on a GPU,
    up to the rounding of batched products)."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 3:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"tokencut_batch: feats must be (B, N, D) patch features of same-size images, got {shape}")
    if len(image_sizes) != feats.shape[0]:
        raise ValueError(f"tokencut_batch: {feats.shape[0]} feature maps but {len(image_sizes)} image sizes")
    F = [as_feats(f, "tokencut") for f in feats]
    grids = [check_grid(feats.shape[1], dims, patch_size, size, "tokencut") for size in image_sizes]
    tau, eps = check_graph_params(tau, eps, "tokencut")
    check_positive_int("tokencut", "max_boxes", max_boxes)
    check_solver(solver, "tokencut")
    if not F:
        return []
    cuts = graph_cuts(torch.stack(F), tau, eps, solver)
    return [finish_tokencut(cut, h, w, p, H, W, max_boxes) for cut, (h, w, p, H, W) in zip(cuts, grids)]
