"""Miners on a batch of images: the device part batched, results identical to the one-image miners.

:func:`lost_batch` runs LOST's ``F Fᵀ``, degrees, stable sort, seed, potentials, similars and heat map
for a batch of same-size images on the features' device, moves the small results to the host in one
transfer and finishes each image on the CPU (connected component, box) with the same code as
:func:`pipeline.discovery.lost.lost`. Every float operation is the one ``lost`` performs, on the
same shapes (one ``F Fᵀ`` per image, one row-sum per image), so results are identical to ``lost``
on the same device (seed, potentials, similars, degree, heat map, mask, box, score).

Miners use it through :meth:`pipeline.discovery.Miner.mine_batch` (``LostMiner`` overrides it; every
other miner runs its images one at a time until it has a batched version).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.discovery.lost import LostResult, check_grid, check_positive_int, finish_lost


def lost_batch(feats: torch.Tensor, dims: tuple[int, int], patch_size: int,
               image_sizes: Sequence[tuple[int, int]], k_patches: int = 100) -> list[LostResult]:
    """LOST on ``B`` images of the same patch grid: ``feats`` (B, N, D) (CPU or CUDA), ``dims = (h, w)``,
    ``image_sizes``: B unpadded ``(H, W)``. Returns B :class:`LostResult`, each equal to
    ``lost(feats[i], dims, patch_size, image_sizes[i], k_patches)``."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 3 or feats.shape[1] < 1 or feats.shape[2] < 1:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"lost_batch: feats must be (B, N, D) patch features of same-size images, got {shape}")
    b, n, _ = feats.shape
    if len(image_sizes) != b:
        raise ValueError(f"lost_batch: {b} feature maps but {len(image_sizes)} image sizes")
    grids = [check_grid(n, dims, patch_size, size, "lost_batch") for size in image_sizes]
    check_positive_int("lost_batch", "k_patches", k_patches)
    if b == 0:
        return []
    F = feats.detach().to(torch.float32)
    if not bool(torch.isfinite(F).all()):
        raise ValueError("lost_batch: feats contain NaN or inf; check the backbone weights and the input image")

    # one F Fᵀ per image: the very GEMM lost() runs (a batched bmm may pick another kernel)
    A = torch.stack([F[i] @ F[i].T for i in range(b)])                  # (B, N, N)
    positive = A > 0
    positive.diagonal(dim1=1, dim2=2).fill_(False)
    degree = positive.sum(dim=2)                                        # (B, N) int64, exact
    order = torch.sort(degree, dim=1, stable=True).indices              # stable: unique result
    seeds = order[:, 0]
    potentials = order[:, : int(k_patches)]                             # (B, k)
    seed_rows = A[torch.arange(b, device=A.device), seeds]              # (B, N)
    sim_sel = torch.gather(seed_rows, 1, potentials) > 0                # (B, k)

    # small results to the host in one go; the heat map needs each image's similars
    seeds_h, pot_h, sel_h = seeds.cpu().numpy(), potentials.cpu().numpy(), sim_sel.cpu().numpy()
    similars = [pot_h[i][sel_h[i]] for i in range(b)]
    heat = torch.stack([A[i][torch.from_numpy(similars[i]).to(A.device, non_blocking=True)].sum(dim=0)
                        for i in range(b)])                             # lost(): A[similars].sum(dim=0)
    degree_h, heat_h = degree.cpu().numpy(), heat.cpu().numpy()
    out = []
    for i, (h, w, p, H, W) in enumerate(grids):
        out.append(finish_lost(int(seeds_h[i]), degree_h[i], pot_h[i], similars[i], heat_h[i], h, w, p, H, W))
    return out


__all__ = ["lost_batch"]
