"""Miners on a batch of images: the device part batched, results identical to the one-image miners.

:func:`lost_batch` runs LOST's ``F Fᵀ``, degrees, stable sort, seed, potentials, similars and heat map
for a batch of same-size images on the features' device, moves the small results to the host in one
transfer and finishes each image on the CPU (connected component, box) with the same code as
:func:`pipeline.discovery.lost.lost`. Every float operation is the one ``lost`` performs, on the
same shapes (one ``F Fᵀ`` per image, one row-sum per image), so results are identical to ``lost``
on the same device (seed, potentials, similars, degree, heat map, mask, box, score).

:func:`run_miner_batch` dispatches through :data:`BATCH_MINERS` (name -> function over a same-size
group); a miner without an entry runs one image at a time through :func:`run_miner`, so a new miner
(tokencut, maskcut) works batched as soon as it is in ``MINERS`` and can add a batched version later.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from pipeline.discovery.lost import LostResult, check_grid, finish_lost


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
    if isinstance(k_patches, bool) or int(k_patches) != k_patches or int(k_patches) < 1:
        raise ValueError(f"lost_batch: k_patches must be a positive integer, got {k_patches!r}")
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


def _lost_group(outputs, image_sizes, patch_size: int, k_patches: int = 100) -> list[LostResult]:
    feats = torch.cat([o.feats for o in outputs]) if len(outputs) > 1 else outputs[0].feats
    return lost_batch(feats, outputs[0].dims, patch_size, image_sizes, k_patches=k_patches)


#: name -> fn(outputs: list of same-dims FeatureOutput (batch 1 each), image_sizes, patch_size, **params)
BATCH_MINERS: dict[str, Callable[..., list]] = {"lost": _lost_group}


def run_miner_batch(name: str, outputs: Sequence, image_sizes: Sequence[tuple[int, int]], /, **params) -> list:
    """Run miner ``name`` on several images: ``outputs[i]`` is image i's FeatureOutput (batch of 1, as
    ``Backbone.features_batch`` returns them), ``image_sizes[i]`` its unpadded (H, W). ``params`` as for
    :func:`run_miner` (``patch_size`` required; ``name``/``stage`` keys ignored). Results in input order,
    each identical to ``run_miner(name, outputs[i], image_sizes[i], **params)``."""
    from pipeline.discovery import MINERS, run_miner

    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known miners: {sorted(MINERS)} (set miner=<name>)")
    if len(outputs) != len(image_sizes):
        raise ValueError(f"run_miner_batch: {len(outputs)} feature outputs but {len(image_sizes)} image sizes")
    fn = BATCH_MINERS.get(name)
    if fn is None:
        return [run_miner(name, o, s, **params) for o, s in zip(outputs, image_sizes)]
    params = dict(params)
    params.pop("stage", None)
    if params.pop("name", name) != name:
        raise ValueError(f"run_miner_batch: params name disagrees with miner {name!r}")
    if "patch_size" not in params:
        raise ValueError(f"run_miner_batch({name!r}): pass patch_size (the backbone's patch size) in params")
    allowed = [k for k in inspect.signature(fn).parameters if k not in ("outputs", "image_sizes")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"run_miner_batch({name!r}): unknown parameter(s) {unknown}; accepted: {allowed}")
    for i, o in enumerate(outputs):
        if o.feats.shape[0] != 1:
            raise ValueError(f"run_miner_batch: output {i} holds {o.feats.shape[0]} images; pass one per image")
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(outputs):
        groups.setdefault((tuple(o.dims), tuple(o.feats.shape[1:]), o.feats.device), []).append(i)
    results: list = [None] * len(outputs)
    for idx in groups.values():
        for i, r in zip(idx, fn([outputs[i] for i in idx], [image_sizes[i] for i in idx], **params)):
            results[i] = r
    return results


__all__ = ["BATCH_MINERS", "lost_batch", "run_miner_batch"]
