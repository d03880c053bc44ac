"""The normalized cut's eigen solve in torch (``solver="torch"``): the fast, opt-in twin of
:func:`pipeline.discovery.tokencut.solve_cut` (``solver="scipy"``, the reference's exact path and the default).

Both return a :class:`~pipeline.discovery.tokencut.Cut` for a graph ``W`` (N, N): the second-smallest
eigenpair of ``(D - W) x = λ D x`` (``v`` D-normalised, ``vᵀ D v = 1``), ``(λ₂, λ₃)``, or ``v = None`` when
the problem is degenerate (``N < 3`` or ``λ₃ - λ₂ <= GAP_TOL``). The sign of ``v`` is arbitrary in both;
TokenCut's and MaskCut's orientation rules (``orient``, ``orient_maskcut``) do not depend on it.

Method. The generalized problem is the standard one of the symmetric normalized Laplacian
``L = I - D^-1/2 W D^-1/2`` with ``x = D^-1/2 y``: the same eigenvalues, and ``yᵀ y = 1`` gives ``xᵀ D x = 1``,
scipy's normalisation. Its smallest eigenvalue is 0 with the known eigenvector ``u = D^1/2 1 / ||D^1/2 1||``
(``W > 0`` everywhere, so the graph is connected and 0 is simple), so ``λ₂, λ₃`` are ``1 - θ₁, 1 - θ₂`` for
the two largest eigenvalues ``θ`` of ``M = D^-1/2 W D^-1/2`` on the complement of ``u``. They are found by a
block Krylov method in float64: block Lanczos with full re-orthogonalisation (block Gram-Schmidt against ``u``
and every earlier block, then QR, all twice) and an explicit Rayleigh-Ritz step (``T = Qᵀ M Q`` from the
stored products ``M Q``, so no three-term recurrence is trusted). ``M X`` is ``s (W (s X))`` with
``s = d^-1/2``: one dense product with ``W`` per block of ``BLOCK`` vectors, ``O(N²)`` work per block where a
dense ``eigh`` is ``O(N³)``. The solve runs on ``W``'s device; on a GPU a batch of same-size graphs is one
batched product per block (``torch.bmm``), on a CPU the graphs are solved one after the other (a batch gains
nothing there) with one torch thread (:func:`one_cpu_thread`). The start block is the same seeded random block
for every graph, so on a CPU a graph gets the same bits alone or in a batch (a GPU's batched products may
round differently by batch size).

When to stop, and when not to trust it: every ``CHECK_EVERY`` blocks at first, sparser as the basis grows
(``k / 64`` blocks apart at ``k`` vectors), each graph's two leading Ritz pairs ``(θ₁, y₁), (θ₂, y₂)`` and
their residuals ``r_i = ||M y_i - θ_i y_i||`` are computed. With ``gap = θ₁ - θ₂`` (the Ritz estimate of
``λ₃ - λ₂``), a graph is done when ``r₂ <= GAP_RTOL * gap`` (so the gap is known to 10 %) and
``r₁ <= VEC_RTOL * gap`` (the eigenvector's error is about ``r₁ / gap``, so ``y₁`` is within ~1e-9 of the
exact unit eigenvector: the size of a dense solver's own rounding for a gap of 1e-4 at N = 3,600); its result
is frozen at that check. Graphs whose gap is known to be below ``DENSE_GAP`` (an ill-conditioned or
degenerate eigenvector), graphs not done within ``MAX_DIM`` (and N / 4) basis vectors, and graphs of at most
``DENSE_BELOW`` nodes are solved densely instead: on a GPU by ``torch.linalg.eigh`` of ``L`` (float64, all
eigenpairs: the method the issue named), on a CPU by the exact path itself
(:func:`~pipeline.discovery.tokencut.solve_cut`; scipy's subset ``eigh`` is faster there than torch's full one,
4.8 s vs 6-8 s at 3,600 nodes on one thread), so on a CPU those graphs get exactly the exact result. The
degeneracy rule is the exact path's: ``λ₃ - λ₂ <= GAP_TOL`` gives ``v = None``.

What is the same as the exact path: the graph (``binary_graph_torch`` computes the float32 ``F Fᵀ`` exactly as
``binary_graph``, per image), the normalisation, the degeneracy threshold. What is not: the eigenvector's last
bits (agreeing to ~1e-9 or better), so a patch within that of the mean (TokenCut's bipartition threshold) can go
the other way, and so can the seed where several patches tie for the largest ``|v|``: patches with identical rows
of ``W`` (a flat region, MaskCut's zeroed patches) have equal entries in exact arithmetic, and which of them wins
is a rounding choice in either solver (on the exact path it moves with the BLAS thread count too); ``λ₃`` agrees
to about ``r₂²/(λ₄ - λ₃)``. ``benchmarks/cut_solver.py`` measures the agreement of boxes and masks and the speed.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

SOLVERS = ("scipy", "torch")

BLOCK = 4            # Krylov block size: a repeated λ₂ up to this multiplicity is seen as repeated
CHECK_EVERY = 2      # blocks between two Rayleigh-Ritz checks (at least; k / 64 at k basis vectors)
MAX_DIM = 800        # basis vectors before giving up on the Krylov method (and at most N / 4; then: dense)
DENSE_BELOW = 256    # graphs of at most this many nodes: dense at once (it is cheap there)
VEC_RTOL = 1e-9      # done when r₁ <= VEC_RTOL * gap ...
GAP_RTOL = 0.1       # ... and r₂ <= GAP_RTOL * gap
DENSE_GAP = 1e-4     # a gap known to be below this: dense eigh (ill-conditioned or degenerate eigenvector)
START_SEED = 0       # the seeded start block (the same for every graph and batch)
MAX_BATCH_ELEMENTS = 2 ** 28  # graph entries solved together (2 GiB of float64 W): 20 graphs of 3,600 nodes


def check_solver(solver, what: str) -> str:
    """``solver`` if it is one of :data:`SOLVERS`, else a ValueError naming ``what`` (the miner)."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"{what}: solver must be one of {', '.join(SOLVERS)} (scipy: the exact path, the "
                         f"reference's generalized eigh; torch: the fast block-Krylov solve in torch, on the "
                         f"features' device), got {solver!r}")
    return solver


def binary_graph_torch(F: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """``binary_graph`` kept on ``F``'s device: float64 ``W`` (N, N) for ``F`` (N, D), or (B, N, N) for
    (B, N, D) (one ``F Fᵀ`` per image, the same float32 product as ``binary_graph``, so the same graph)."""
    if F.dim() == 3:
        return torch.stack([binary_graph_torch(f, tau, eps) for f in F])
    Fn = torch.nn.functional.normalize(F, p=2, dim=1)
    A = Fn @ Fn.T
    one = torch.ones((), dtype=torch.float64, device=A.device)
    return torch.where(A > tau, one, torch.full((), float(eps), dtype=torch.float64, device=A.device))


def _cut(v, vals):
    from pipeline.discovery.tokencut import GAP_TOL, Cut

    vals = np.asarray(vals, dtype=np.float64)
    if v is None or not vals[1] - vals[0] > GAP_TOL:
        return Cut(None, vals)
    return Cut(np.asarray(v, dtype=np.float64), vals)


def _dense(W: torch.Tensor, s: torch.Tensor) -> list:
    """The dense solve for a batch (B, N, N): on a CPU the exact path itself (scipy's subset ``eigh``, faster
    there than torch's full one), elsewhere :func:`_dense_eigh`."""
    if W.device.type == "cpu":
        from pipeline.discovery.tokencut import solve_cut

        return [solve_cut(w.numpy()) for w in W]
    return _dense_eigh(W, s)


def _dense_eigh(W: torch.Tensor, s: torch.Tensor) -> list:
    """Dense ``torch.linalg.eigh`` of ``L = I - s W s`` for a batch (B, N, N): eigenpairs 1 and 2 of L."""
    M = s[:, :, None] * W * s[:, None, :]
    L = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - M
    vals, vecs = torch.linalg.eigh(L)
    v = (s * vecs[:, :, 1]).cpu().numpy()
    vals = vals[:, 1:3].cpu().numpy()
    return [_cut(v[i], vals[i]) for i in range(W.shape[0])]


def _orthonormalize(X: torch.Tensor, u: torch.Tensor, basis: torch.Tensor | None, gen: torch.Generator,
                    ) -> torch.Tensor:
    """The rows of ``X`` (B, b, N) made orthonormal and orthogonal to ``u`` (B, 1, N) and to the rows of
    ``basis`` (B, k, N): block classical Gram-Schmidt and QR, then both again ("twice is enough"; a row nearly
    dependent on the others of its block comes out of the first QR as rounding noise, which the second pass
    makes orthogonal: any orthonormal vector is a valid basis vector for the Rayleigh-Ritz step). A row that
    vanishes (its Krylov space is invariant) is replaced by a seeded random one first."""

    def project(Y):
        Y = Y - (Y @ u.transpose(1, 2)) @ u
        if basis is not None:
            Y = Y - (Y @ basis.transpose(1, 2)) @ basis
        return Y

    def qr(Y):
        Q, R = torch.linalg.qr(Y.transpose(1, 2))
        return Q.transpose(1, 2), R

    for _ in range(3):
        norm0 = X.norm(dim=2).clamp_min(1e-300)                          # (B, b)
        Q, R = qr(project(X))
        lost = R.diagonal(dim1=1, dim2=2).abs() <= 1e-10 * norm0          # (B, b)
        if not bool(lost.any()):
            break
        fresh = torch.randn(X.shape[1], X.shape[2], generator=gen, dtype=X.dtype).to(X.device)
        X = torch.where(lost[:, :, None], fresh.expand_as(X), X)
    return qr(project(Q))[0]


def solve_cut_torch(W) -> "Cut | list[Cut]":
    """The torch twin of :func:`~pipeline.discovery.tokencut.solve_cut` (see the module docstring): ``W``
    (N, N) -> one ``Cut``; (B, N, N) -> a list of B. numpy or torch, float64 arithmetic on ``W``'s device
    (numpy: the CPU)."""
    Wt = torch.as_tensor(W)
    if Wt.dim() not in (2, 3) or Wt.shape[-1] != Wt.shape[-2]:
        raise ValueError(f"solve_cut_torch: W must be (N, N) or (B, N, N), got {tuple(Wt.shape)}")
    single = Wt.dim() == 2
    Wt = (Wt[None] if single else Wt).to(torch.float64)
    b, n = Wt.shape[0], Wt.shape[-1]
    if b == 0:
        return []
    if n < 3:
        cuts = [_cut(None, np.full(2, np.nan)) for _ in range(b)]
    else:
        solve = _dense if n <= DENSE_BELOW else _krylov
        with one_cpu_thread(Wt.device):
            s = Wt.sum(dim=-1).rsqrt()                                  # (B, N) d^-1/2
            if Wt.device.type == "cpu":  # one graph at a time: no gain from a batch, and the same bits alone
                cuts = [solve(Wt[i:i + 1], s[i:i + 1])[0] for i in range(b)]
            else:
                cuts = solve(Wt, s)
    return cuts[0] if single else cuts


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """One torch intra-op thread while solving on a CPU (restored after), as the exact path pins BLAS to one
    thread: the same bits whatever the machine's thread count, and no OpenMP threads spin-waiting for a busy
    core (measured on 2 shared cores at load ~6: 3,600 nodes in 0.21 s with one thread, 1.8-2.6 s with two)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _krylov(W: torch.Tensor, s: torch.Tensor) -> list:
    """Block Krylov with explicit Rayleigh-Ritz for a batch (B, N, N), N > BLOCK + 2; basis vectors are rows."""
    b, n = W.shape[0], W.shape[-1]
    dev, f64 = W.device, torch.float64
    gen = torch.Generator().manual_seed(START_SEED)
    u = (1.0 / s)[:, None, :]
    u = u / u.norm(dim=2, keepdim=True)                                 # (B, 1, N) the trivial eigenvector
    sr = s[:, None, :]
    max_dim = max(2 * BLOCK, min(MAX_DIM, n // 4) // BLOCK * BLOCK)
    Q = torch.zeros(b, max_dim, n, dtype=f64, device=dev)               # the basis, one vector per row
    MQ = torch.zeros(b, max_dim, n, dtype=f64, device=dev)              # M times it
    T = torch.zeros(b, max_dim, max_dim, dtype=f64, device=dev)         # Qᵀ M Q
    start = torch.randn(BLOCK, n, generator=gen, dtype=f64).to(dev).expand(b, BLOCK, n)
    Q[:, :BLOCK] = _orthonormalize(start, u, None, gen)
    results: list = [None] * b
    dense: list[int] = []
    k, next_check = 0, CHECK_EVERY
    while True:
        blk = slice(k, k + BLOCK)
        MQ[:, blk] = ((Q[:, blk] * sr) @ W) * sr                        # (M X)ᵀ = (s X) W s, W symmetric
        k += BLOCK
        T[:, :k, blk] = Q[:, :k] @ MQ[:, blk].transpose(1, 2)
        T[:, blk, : k - BLOCK] = T[:, : k - BLOCK, blk].transpose(1, 2)
        last = k + BLOCK > max_dim
        if k >= next_check * BLOCK or last:
            # checks get sparser as the basis grows (each costs an eigh of k x k)
            next_check = k // BLOCK + max(CHECK_EVERY, k // 64)
            Tk = T[:, :k, :k]
            theta, S = torch.linalg.eigh((Tk + Tk.transpose(1, 2)) / 2)
            theta2, S2 = theta[:, -2:].flip(-1), S[:, :, -2:].flip(-1)  # the two largest, descending
            Y = S2.transpose(1, 2) @ Q[:, :k]                           # (B, 2, N) Ritz vectors
            r = (S2.transpose(1, 2) @ MQ[:, :k] - theta2[:, :, None] * Y).norm(dim=2)   # (B, 2)
            gap = theta2[:, 0] - theta2[:, 1]
            done = (r[:, 1] <= GAP_RTOL * gap) & (r[:, 0] <= VEC_RTOL * gap)
            small = (gap < DENSE_GAP) & (r.max(dim=1).values <= 0.1 * DENSE_GAP)
            done_h, small_h = done.cpu().numpy(), small.cpu().numpy()
            fresh = [i for i in range(b) if results[i] is None and i not in dense and (done_h[i] or small_h[i])]
            if fresh:
                v = (s * Y[:, 0]).cpu().numpy()
                lam = (1.0 - theta2).cpu().numpy()
                for i in fresh:
                    if done_h[i]:
                        results[i] = _cut(v[i], lam[i])
                    else:
                        dense.append(i)
            if last or all(results[i] is not None or i in dense for i in range(b)):
                break
        Q[:, k:k + BLOCK] = _orthonormalize(MQ[:, blk], u, Q[:, :k], gen)
    dense += [i for i in range(b) if results[i] is None and i not in dense]
    if dense:
        idx = torch.tensor(sorted(dense), device=dev)
        for i, cut in zip(sorted(dense), _dense(W[idx], s[idx])):
            results[i] = cut
    return results


def graph_cuts(F: torch.Tensor, tau: float, eps: float, solver: str = "torch") -> list:
    """The cuts of ``B`` images' graphs, ``F`` (B, N, D) on any device: ``binary_graph_torch`` and
    :func:`solve_cuts`, in chunks of at most ``MAX_BATCH_ELEMENTS`` graph entries (float64) at a time on a GPU,
    one graph at a time on a CPU (where the solves are one at a time anyway)."""
    b, n = F.shape[0], F.shape[1]
    step = 1 if F.device.type == "cpu" else max(1, MAX_BATCH_ELEMENTS // max(1, n * n))
    cuts: list = []
    for i in range(0, b, step):
        cuts += solve_cuts(binary_graph_torch(F[i:i + step], tau, eps), solver)
    return cuts


def solve_cuts(W, solver: str = "scipy"):
    """Dispatch: ``solver="scipy"`` -> :func:`~pipeline.discovery.tokencut.solve_cut` (numpy; a (B, N, N)
    batch one graph at a time), ``"torch"`` -> :func:`solve_cut_torch`. ``W`` (N, N) -> a ``Cut``,
    (B, N, N) -> a list of ``Cut``."""
    check_solver(solver, "solve_cuts")
    if solver == "torch":
        return solve_cut_torch(W)
    from pipeline.discovery.tokencut import solve_cut

    Wn = W.detach().cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W)
    return solve_cut(Wn) if Wn.ndim == 2 else [solve_cut(w) for w in Wn]


__all__: Sequence[str] = ["SOLVERS", "binary_graph_torch", "check_solver", "graph_cuts", "solve_cut_torch",
                          "solve_cuts"]
